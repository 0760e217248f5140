"""``emokernels components``: neurons, heads and difference vectors in one pass; plots; validation.

    emokernels components --model smollm2-135m --directions runs/dirs --split train --limit 8 \\
        --out runs/components [--validate --val-split test --val-limit 2]

One backbone forward per batch of emotion-prompted train units feeds three streaming
collectors: the neuron decomposition (METHOD §6.1), the one-pass head ablation scores (§6.2)
and the component-space difference vectors (§7). Writes into ``--out``:

* ``neurons.safetensors``/``.json`` + ``neurons_{e}.csv`` (layer, neuron, rank, C_mean, C_pos,
  C_neg, beta, H_mean), ``neurons_{e}.png`` (per-layer contribution profile);
* ``heads.safetensors``/``.json`` + ``heads_{e}.csv``, ``heads_{e}.png`` (layer × head heatmap);
* ``diffs.safetensors``/``.json`` (Δz [L, 6, H·hd], Δa [L, 6, d_ff]);
* ``summary.json`` (top heads / neurons per emotion, timings);
* with ``--validate``: ``validation.json``/``.csv``, ``validation_{local,final}.png``.

A killed run resumes from ``components_checkpoint.safetensors`` (same inputs required).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time

from . import options as opt


# The checkpoint fingerprint keeps the dtype names it was written with before the short spellings.
_FINGERPRINT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("components", help="rank emotion neurons and heads, difference vectors, validation",
                              description=__doc__, formatter_class=opt.HelpFormatter)
    opt.add_model(p)
    p.add_argument("--directions", required=True, help="directions artifact (folder or .safetensors) from `emokernels directions`")
    opt.add_split(p, "train", help="discovery split: 'train' or a SEV JSONL path (never 'test')")
    opt.add_limit(p, "train", help="first N skeletons (N x 3 contexts x 6 emotions prompts)")
    p.add_argument("--accepted", default=None, help="judged JSONL: keep only accepted units (the paper's filter)")
    p.add_argument("--preset", default="strong", help="emotion prompt preset: strong | paper | template with {emotion}")
    p.add_argument("--reading", choices=("residual", "normed"), default="residual",
                   help="head score read on m (residual, default) or on the MLP input RMSNorm(m) (normed, the paper)")
    opt.add_dtype(p, "fp32")
    opt.add_batch_size(p, 6, help="prompts per forward (6 = one context)")
    p.add_argument("--checkpoint-every", type=opt.positive_int, default=20, metavar="N", help="batches between checkpoints")
    p.add_argument("--top", type=opt.positive_int, default=5, metavar="N", help="top heads / neurons per emotion in summary.json")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("--validate", action="store_true", help="run ablation / enhancement validation afterwards")
    p.add_argument("--val-split", default="test", help="evaluation split for --validate (held out from discovery)")
    opt.add_limit(p, "test", flag="--val-limit", default=2, help="skeletons of the evaluation split")
    p.add_argument("--ks-neurons", type=_ints, default=[1, 4, 16, 64], help="numbers of top neurons to ablate / enhance")
    p.add_argument("--ks-heads", type=_ints, default=[1, 2, 4, 8], help="numbers of top heads to ablate / enhance")
    p.add_argument("--n-random", type=opt.positive_int, default=5, metavar="N", help="random draws per k")
    p.add_argument("--val-layers", type=opt.layers_arg, default=None,
                   help="0-based layers to pick components from, 'a-b' or 'a,b,c' (default: all)")
    p.add_argument("--enhance-scale", type=opt.finite_float, default=1.0, help="s in the additive enhancement s·Δ")
    opt.add_judge(p, default=None, help="also judge generations with this judge; slow (default: none)")
    opt.add_out(p, "dir")
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="apply directions estimated on another model (name or config differs) anyway")
    p.set_defaults(func=run)


def _fingerprint(args, units, dirs_hash: str, model_desc: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([str(args.model), _FINGERPRINT_DTYPES.get(args.dtype, args.dtype), args.preset, args.reading, args.batch_size, dirs_hash, model_desc],
                        sort_keys=True).encode())
    for u in units:
        h.update(u.key.encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# command
# ---------------------------------------------------------------------------------------------
def run(args) -> int:
    from ..data.prompts import PromptConfig
    from ..data.sev import dataset_hash, load_split
    from ..io import write_json
    from ..models.adapters import Adapter
    from ..models.identity import model_identity
    from ..models.loader import load, model_source
    from ..discover.capture import load_accepted_keys
    from ..discover.components import discover_components, plot_heads, plot_neurons, summarise
    from ..discover.directions import EmotionDirections
    from ..discover.collect import direction_tensors, sev_units

    if args.split == "test":
        raise ValueError("components are discovered on the train split only; the test split stays held out "
                         "(--validate evaluates on --val-split)")
    if args.validate and str(args.val_split) == str(args.split):
        raise ValueError(f"--val-split {args.val_split!r} equals the discovery split; validate on held-out data")
    model_source(args.model)
    out = opt.check_out_dir(args.out)
    opt.check_artifact(args.directions, "--directions", "directions", "emokernels directions")
    opt.check_limit(args.split, args.limit)
    if args.validate:
        opt.check_limit(args.val_split, args.val_limit, "--val-limit")
    if args.accepted:
        opt.check_in_file(args.accepted, "--accepted")
    args.dtype = opt.resolved_dtype_name(args.dtype)
    out.mkdir(parents=True, exist_ok=True)
    config = PromptConfig(preset=args.preset)
    config.system("anger")  # validates the preset early
    t0 = time.time()
    model, tok = load(args.model, dtype=args.dtype)
    a = Adapter.of(model)
    dirs = EmotionDirections.load(args.directions, model=model,
                                  allow_model_mismatch=getattr(args, "allow_model_mismatch", False))
    dirs_attn, dirs_mlp = direction_tensors(dirs)
    skeletons = load_split(args.split, args.limit)
    accepted = load_accepted_keys(args.accepted) if args.accepted else None
    units = sev_units(skeletons, keep=accepted)
    if not units:
        raise ValueError("no units: the split is empty or no judged row was accepted")
    dirs_hash = hashlib.sha256(dirs.directions.numpy().tobytes()).hexdigest()[:16]
    fp = _fingerprint(args, units, dirs_hash, a.describe())
    neurons, heads, diffs, secs = discover_components(
        model, tok, units, dirs_attn, dirs_mlp, reading=args.reading, prompt_config=config, batch_size=args.batch_size,
        checkpoint=out / "components_checkpoint", checkpoint_every=args.checkpoint_every, fingerprint=fp)
    meta = dict(model=str(args.model), dtype=args.dtype, split=str(args.split), limit=args.limit, accepted=args.accepted,
                dataset_hash=dataset_hash(skeletons), directions=str(args.directions), directions_hash=dirs_hash,
                directions_source=dirs.source, prompt=config.to_dict(), n_units=len(units), model_shape=a.describe(),
                model_identity=model_identity(model))
    neurons.save(out / "neurons", meta)
    neurons.write_csv(out)
    heads.save(out / "heads", meta)
    heads.write_csv(out)
    diffs.save(out / "diffs", meta)
    summary = dict(meta, seconds_pass=round(secs, 2), n_groups=diffs.n_groups, n_incomplete=diffs.n_incomplete,
                   reading=args.reading, top=summarise(neurons, heads, diffs, args.top))
    if not args.no_plots:
        plot_heads(heads, out)
        plot_neurons(neurons, out)
    print(f"components: {len(units)} prompts in {secs:.1f}s -> {out}")
    for name, s in summary["top"].items():
        hs = ", ".join(f"{h['layer']}.{h['head']} ({h['I']:.3g})" for h in s["heads"][:3])
        ns = ", ".join(f"{n['layer']}.{n['neuron']} ({n['C_mean']:.3g})" for n in s["neurons"][:3])
        print(f"  {name:9s} heads {hs} | neurons {ns}")

    if args.validate:
        from ..evaluate.validation import plot_validation, validate_components

        val_sk = load_split(args.val_split, args.val_limit)
        overlap = {s.skeleton_id for s in val_sk} & {s.skeleton_id for s in skeletons}
        if overlap:
            raise ValueError(f"--val-split shares skeletons with the discovery split: {sorted(overlap)[:5]}")
        judge = None
        if args.judge:
            from ..judge.base import get_judge

            judge = get_judge(args.judge)
        t1 = time.time()
        res = validate_components(model, tok, sev_units(val_sk), neurons, heads, diffs, dirs_attn, dirs_mlp,
                                  ks_neurons=args.ks_neurons, ks_heads=args.ks_heads, n_random=args.n_random,
                                  layers_neurons=args.val_layers, layers_heads=args.val_layers,
                                  enhance_scale=args.enhance_scale, prompt_config=config, judge=judge)
        res.config.update(val_split=str(args.val_split), val_limit=args.val_limit, seconds=round(time.time() - t1, 1))
        res.save(out)
        if not args.no_plots:
            plot_validation(res, out)
        summary["validation"] = res.summary("final")
        summary["validation_local"] = res.summary("local")
        for r in summary["validation"]:
            print(f"  {r['kind']:7s} {r['mode']:7s} k={r['k']:3d}  Δfinal top {r['top_mean']:+.4f}  random "
                  f"{r['random_mean']:+.4f}  d(median)={r['cohens_d_median']:+.2f}  top beats random in {r['top_beats_random']}/"
                  f"{r['n_emotions']}")
    summary["seconds_total"] = round(time.time() - t0, 1)
    summary_path = write_json(out / "summary.json", summary)
    opt.wrote(out, f"neurons, heads, diffs{', validation' if args.validate else ''}; summary {summary_path}")
    return 0
