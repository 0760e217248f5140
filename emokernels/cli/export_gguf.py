r"""``emokernels export-gguf``: one emotion's directions as a llama.cpp control vector.

    emokernels export-gguf --directions runs/smollm2-135m/directions/text --emotion anger --out anger.gguf
    llama-cli -m SmolLM2-135M-Instruct.gguf --control-vector anger.gguf -p "..."

llama.cpp adds tensor ``direction.k`` of the file, as it is, to the output of block k (0-based;
our ``resid_post`` of layer k) at every position, prompt included; ``--control-vector-scaled
FILE s`` multiplies it by s first. So the strength is baked into the file:

    direction.k = α · σ_k · v_k        k in --layers (default round(0.39L)..round(0.71L))

with v_k the unit mlp-point direction of the emotion at layer k and σ_k the mean residual rms
there (measured with the directions), which turns our steering h += α·rms(h)·v into a constant
vector of the same typical size. α defaults to ``emokernels steer``'s default 8·√(d/3072) (the
paper's α = 8 at d = 3072, scaled to keep the added norm / residual norm ratio α/√d); ``--strength``
takes a number (a multiple of rms), ``default`` or ``paper`` (8). ``--raw`` writes the unit vectors
(α = 1, no σ) for tools that scale themselves. Metadata: ``general.architecture = controlvector``,
``controlvector.model_hint``, ``controlvector.layer_count``; the file is read back and compared
before it replaces ``--out``.
"""
from __future__ import annotations

from . import options as opt


def register(subparsers) -> None:
    from ..data.labels import EMOTIONS

    p = subparsers.add_parser("export-gguf", help="write one emotion's directions as a llama.cpp --control-vector GGUF",
                              description=__doc__, formatter_class=opt.HelpFormatter)
    p.add_argument("--directions", required=True, help="folder or .safetensors written by `emokernels directions` / `run`")
    p.add_argument("--emotion", required=True, choices=EMOTIONS, help="the emotion to export")
    p.add_argument("--strength", type=opt.arg_type(_strength), default="default",
                   help="α in units of the residual rms: a number, 'default' (8*sqrt(d/3072)) or 'paper' (8)")
    p.add_argument("--layers", type=opt.layers_arg, default=None,
                   help="0-based blocks 1..L-1, 'a-b' or 'a,b,c' (default: round(0.39L)..round(0.71L), as `steer`)")
    p.add_argument("--raw", action="store_true", help="unit directions (α = 1, no σ scaling)")
    p.add_argument("--model-hint", default=None, help="controlvector.model_hint (default: the directions' model)")
    opt.add_out(p, "file", help="output .gguf")
    p.set_defaults(func=run)


def _strength(text: str):
    import math

    if text in ("default", "paper"):
        return text
    try:
        s = float(text)
    except ValueError:
        raise ValueError(f"expected a number, 'default' or 'paper', got {text!r}") from None
    if not math.isfinite(s) or s == 0:
        raise ValueError(f"must be a finite, non-zero number, got {text!r}")
    return s


def run(args) -> int:
    import importlib.util

    out = opt.check_out_file(args.out)
    opt.check_artifact(args.directions, "--directions", "directions", "emokernels directions")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("export-gguf needs the gguf package: pip install gguf")

    from ..discover.directions import EmotionDirections, default_layers
    from ..control.steering import PAPER_ALPHA, default_alpha

    dirs = EmotionDirections.load(args.directions)
    if "mlp" not in dirs.points:
        raise ValueError(f"{args.directions} holds no mlp-point directions; llama.cpp control vectors act on block outputs")
    alpha = {"default": default_alpha(dirs.hidden_size), "paper": float(PAPER_ALPHA)}.get(args.strength, args.strength)
    if args.raw:
        alpha = 1.0
    layers = args.layers if args.layers is not None else default_layers(dirs.num_layers)
    hint = args.model_hint or dirs.model or "unknown"
    path = dirs.export_gguf_control_vector(out, args.emotion, layers=layers, scale=alpha, rms_dose=not args.raw,
                                           model_hint=hint)
    p = dirs.point_index("mlp")
    norms = [float(alpha * (1.0 if args.raw else dirs.sigma[p, k])) for k in layers]
    how = "unit vectors" if args.raw else f"α = {alpha:.3g} × residual rms σ_k"
    opt.wrote(path, f"{args.emotion}, blocks {layers[0]}-{layers[-1]} ({len(layers)}), {how}, "
                    f"‖direction.k‖ {min(norms):.3g}-{max(norms):.3g}; use: llama-cli --control-vector {path}")
    return 0
