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
from pathlib import Path


def register(subparsers) -> None:
    from ..judge.base import DEFAULT as DEFAULT_JUDGE, JUDGES

    p = subparsers.add_parser("steer", help="steering baseline: generate with emotion directions added, then judge",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--directions", required=True, help="folder or .safetensors written by `emokernels directions`")
    p.add_argument("--split", default="test", help="evaluation split (default test)")
    p.add_argument("--limit", type=int, default=None, help="first N skeletons")
    p.add_argument("--alpha", default="default", help="a number, 'default' (8*sqrt(d/3072)), 'paper' (8) or 'auto' (train sweep)")
    p.add_argument("--sweep-alphas", default="0.5,1,2,3", help="auto: multiples of the default α to try")
    p.add_argument("--sweep-limit", type=int, default=2, help="auto: train skeletons for the sweep")
    p.add_argument("--max-degenerate", type=float, default=0.5, help="auto: reject α with more degenerate outputs than this")
    p.add_argument("--layers", default=None, help="e.g. '11-20' (default round(0.39L)..round(0.71L))")
    p.add_argument("--point", choices=("mlp", "attn"), default="mlp")
    p.add_argument("--judge", default=DEFAULT_JUDGE, choices=list(JUDGES), help="the judge of the steered replies")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="generations JSONL")
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="apply directions estimated on another model (name or config differs) anyway")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..data.sev import iter_units, load_split
    from ..discover.directions import EmotionDirections
    from ..evaluate.naturalness import degenerate
    from ..io import write_json
    from ..judge.base import get_judge
    from ..judge.cli import judge_rows
    from ..judge.report import write_report
    from ..models.loader import load
    from .steering import Steering, alpha_sweep, default_alpha, steer_generate

    t0 = time.time()
    out = Path(args.out)
    model, tok = load(args.model, dtype=getattr(torch, args.dtype))
    dirs = EmotionDirections.load(args.directions, model=model,
                                  allow_model_mismatch=getattr(args, "allow_model_mismatch", False))
    judge = get_judge(args.judge)
    base = default_alpha(dirs.hidden_size)
    sweep = None
    if args.alpha == "auto":
        mults = [float(x) for x in args.sweep_alphas.split(",") if x.strip()]
        train_units = list(iter_units(load_split("train", args.sweep_limit)))
        sweep = alpha_sweep(model, tok, dirs, train_units, [m * base for m in mults], judge, layers=args.layers,
                            point=args.point, max_degenerate=args.max_degenerate,
                            out_dir=out.with_name(out.stem + "_sweep"), batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, progress=not args.no_progress, model_name=args.model)
        alpha = sweep["alpha"]
    elif args.alpha == "default":
        alpha = base
    elif args.alpha == "paper":
        alpha = 8.0
    else:
        try:
            alpha = float(args.alpha)
        except ValueError:
            raise ValueError(f"--alpha must be a number, 'default', 'paper' or 'auto', got {args.alpha!r}") from None
    st = Steering(dirs, alpha=alpha, layers=args.layers, point=args.point)
    units = list(iter_units(load_split(args.split, args.limit)))
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
    write_json(out.with_name(out.stem + ".summary.json"), summary)
    o = rep["accuracy"]["overall"]
    print(f"steer: α={alpha:.3g} layers {st.layers[0]}-{st.layers[-1]} ({st.point}); {args.judge} accuracy "
          f"{o['hits']}/{o['n']}, degenerate {degen}/{n}; {judged_path} ({time.time() - t0:.1f}s)")
    return 0
