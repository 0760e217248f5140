"""``emokernels steer``: generate under steering (neutral prompt) and judge it.

    emokernels steer --model smollm2-135m --directions runs/dirs --split test --limit 2 --alpha auto --out runs/steer.jsonl

``--alpha auto`` sweeps ``--sweep-alphas`` (multiples of the default α = 8·√(d/3072)) on the
**train** split (``--sweep-limit`` skeletons) and keeps the best α whose outputs are mostly
natural; ``--alpha default`` uses 8·√(d/3072); ``--alpha paper`` uses 8. Writes the
generations ``--out`` (resumable JSONL), the judged rows ``<out>.judged.jsonl``, the judge
report folder ``<out stem>_report/`` and ``<out stem>.summary.json`` (α, sweep, accuracy,
naturalness).
"""
from __future__ import annotations

import argparse

import time

from . import options as opt


def register(subparsers) -> None:
    p = subparsers.add_parser("steer", help="steering baseline: generate with emotion directions added, then judge",
                              description=__doc__, formatter_class=opt.HelpFormatter)
    opt.add_model(p)
    p.add_argument("--directions", required=True, help="folder or .safetensors written by `emokernels directions`")
    opt.add_split(p, "test", help="evaluation split: train | test | a SEV JSONL path")
    opt.add_limit(p, "test")
    p.add_argument("--alpha", type=opt.arg_type(_alpha), default="default",
                   help="a number, 'default' (8*sqrt(d/3072)), 'paper' (8) or 'auto' (train sweep)")
    p.add_argument("--sweep-alphas", type=opt.arg_type(_sweep), default="0.5,1,2,3", help="auto: multiples of the default α to try")
    p.add_argument("--sweep-limit", type=opt.positive_int, default=2, metavar="N", help="auto: train skeletons for the sweep")
    p.add_argument("--max-degenerate", type=opt.finite_float, default=0.5,
                   help="auto: reject α with more degenerate outputs than this")
    p.add_argument("--layers", type=opt.layers_arg, default=None,
                   help="0-based layers, 'a-b' or 'a,b,c' (default: round(0.39L)..round(0.71L))")
    p.add_argument("--point", choices=("mlp", "attn"), default="mlp", help="add after the MLP or after attention")
    opt.add_judge(p, help="the judge of the steered replies")
    opt.add_batch_size(p, 8)
    opt.add_max_new_tokens(p, None, help="tokens per reply (default: the shared decoding setup's 48)")
    opt.add_dtype(p, "bf16")
    opt.add_progress(p)
    opt.add_out(p, "file", help="generations JSONL; beside it <stem>.judged.jsonl, <stem>_report/, <stem>.summary.json")
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="apply directions estimated on another model (name or config differs) anyway")
    p.set_defaults(func=run)


def _alpha(text: str):
    """'auto' | 'default' | 'paper' | a finite number."""
    if text in ("auto", "default", "paper"):
        return text
    try:
        return opt.finite_float(text)
    except argparse.ArgumentTypeError:
        raise ValueError(f"--alpha must be a finite number, 'default', 'paper' or 'auto', got {text!r}") from None


def _sweep(text: str) -> list[float]:
    import math

    try:
        mults = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--sweep-alphas must be comma-separated numbers, got {text!r}") from None
    if not mults or not all(math.isfinite(m) for m in mults):
        raise ValueError(f"--sweep-alphas must be one or more finite numbers, got {text!r}")
    return mults


def run(args) -> int:
    from ..data.sev import iter_units, load_split
    from ..discover.directions import EmotionDirections
    from ..evaluate.naturalness import degenerate
    from ..io import write_json
    from ..judge.base import get_judge
    from ..judge.rows import judge_rows
    from ..judge.report import write_report
    from ..models.loader import load, model_source
    from ..control.steering import Steering, alpha_sweep, default_alpha, parse_layers, steer_generate

    model_source(args.model)
    out = opt.check_out_file(args.out)
    opt.check_artifact(args.directions, "--directions", "directions", "emokernels directions")
    opt.check_limit(args.split, args.limit)
    alpha_spec = args.alpha
    mults = args.sweep_alphas if alpha_spec == "auto" else None
    units = list(iter_units(load_split(args.split, args.limit)))
    train_units = list(iter_units(load_split("train", args.sweep_limit))) if mults else None
    # read once without the model, so a layer outside it fails before the model loads
    parse_layers(args.layers, EmotionDirections.load(args.directions).num_layers)
    t0 = time.time()
    model, tok = load(args.model, dtype=args.dtype)
    dirs = EmotionDirections.load(args.directions, model=model,
                                  allow_model_mismatch=getattr(args, "allow_model_mismatch", False))
    judge = get_judge(args.judge)
    base = default_alpha(dirs.hidden_size)
    sweep = None
    if alpha_spec == "auto":
        sweep = alpha_sweep(model, tok, dirs, train_units, [m * base for m in mults], judge, layers=args.layers,
                            point=args.point, max_degenerate=args.max_degenerate,
                            out_dir=out.with_name(out.stem + "_sweep"), batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, progress=not args.no_progress, model_name=args.model)
        alpha = sweep["alpha"]
    elif alpha_spec == "default":
        alpha = base
    elif alpha_spec == "paper":
        alpha = 8.0
    else:
        alpha = alpha_spec
    st = Steering(dirs, alpha=alpha, layers=args.layers, point=args.point)
    rows = steer_generate(model, tok, st, units, out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          progress=not args.no_progress, model_name=args.model,
                          extra={"directions": str(args.directions), "split": str(args.split)})
    judged_path = out.with_name(out.stem + ".judged.jsonl")
    judged = judge_rows(rows, judge, judged_path, progress=not args.no_progress)
    rep = write_report(judged, out.with_name(out.stem + "_report"))
    n = len(judged)
    degen = sum(degenerate(r["text"]) for r in judged)
    summary = dict(model=args.model, directions=str(args.directions), directions_source=dirs.source, split=args.split,
                   limit=args.limit, n=n, alpha=alpha, default_alpha=base, steering=st.describe(), judge=judge.describe(),
                   accuracy=rep["accuracy"], degenerate_rate=degen / max(1, n), sweep=sweep,
                   seconds=round(time.time() - t0, 1))
    summary_path = write_json(out.with_name(out.stem + ".summary.json"), summary)
    o = rep["accuracy"]["overall"]
    print(f"steer: α={alpha:.3g} layers {st.layers[0]}-{st.layers[-1]} ({st.point}); {args.judge} accuracy "
          f"{o['hits']}/{o['n']}, degenerate {degen}/{n}; judged rows {judged_path} ({time.time() - t0:.1f}s)")
    opt.wrote(out, f"{len(rows)} rows; summary {summary_path}")
    return 0
