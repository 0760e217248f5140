"""``emokernels directions``: capture → directions → consistency → plots.

    emokernels directions --model smollm2-135m --split train --limit 8 --source prompt --out runs/dirs

Writes into ``--out``: ``directions.safetensors`` + ``directions.json`` (the artifact),
``consistency.json`` / ``consistency.md`` (evidence, layers ranked by stability),
``consistency.png`` and ``cross_layer_*.png``. Discovery reads the train split only; the test
split (``--probe-split``) is used solely to *evaluate* the probe and the directions.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from . import options as opt


def register(subparsers) -> None:
    p = subparsers.add_parser("directions", help="estimate context-agnostic emotion directions and check them",
                              description=__doc__, formatter_class=opt.HelpFormatter)
    opt.add_model(p)
    opt.add_split(p, "train", help="discovery split: 'train' or a SEV JSONL path (never 'test')")
    opt.add_limit(p, "train", help="N skeletons of the split (N x 3 contexts)")
    p.add_argument("--select", choices=("first", "balanced"), default="first",
                   help="with --limit: the first N skeletons in file order, or N taken round-robin over themes "
                        "(balanced: leave-one-theme-out needs at least two themes)")
    p.add_argument("--source", choices=("prompt", "text"), default="prompt",
                   help="prompt: readout of emotion prompts (the paper); text: mean state over emotional replies")
    p.add_argument("--accepted", default=None,
                   help="judged JSONL: prompt source keeps only accepted units; text source uses their reply texts")
    p.add_argument("--texts", default=None,
                   help="text source: JSONL of {emotion|label, text} reference replies (default: packaged judge references)")
    p.add_argument("--texts-per-emotion", type=opt.nonnegative_int, default=5,
                   help="text source with reference replies: the first K replies of each emotion (0 = all)")
    p.add_argument("--preset", default="strong", help="emotion prompt preset: strong | paper | a template with {emotion}")
    p.add_argument("--paper-final-norm", action="store_true",
                   help="read the last layer's mlp point after the final RMSNorm, like the paper (METHOD §11.1)")
    opt.add_dtype(p, "fp32")
    opt.add_batch_size(p, 16)
    p.add_argument("--probe-split", default="test", help="held-out split for the probe ('none' to skip)")
    opt.add_limit(p, "test", flag="--probe-limit", default=4,
                  help="skeletons of the held-out split for the probe (picked like --select)")
    p.add_argument("--probe-steps", type=opt.positive_int, default=300, help="training steps of the linear probe")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("--per-emotion-plots", action="store_true", help="also one cross-layer heatmap PNG per emotion")
    opt.add_out(p, "dir")
    p.set_defaults(func=run)


def _load_texts(path) -> dict[str, list[str]]:
    from ..data.labels import EMOTIONS
    from ..io import read_jsonl

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"texts file not found: {path}")
    refs: dict[str, list[str]] = {e: [] for e in EMOTIONS}
    for i, row in enumerate(read_jsonl(path), 1):
        emo = row.get("emotion", row.get("label"))
        if emo == "neutral":
            continue
        if emo not in refs or not isinstance(row.get("text"), str):
            raise ValueError(f"{path}: line {i}: expected {{'emotion': one of {list(EMOTIONS)}, 'text': str}}")
        refs[emo].append(row["text"])
    return refs


def _auto_probe_layers(n_units: int, num_layers: int, d: int, budget_bytes: int = 1 << 30) -> list[int]:
    per_layer = max(1, n_units * 2 * d * 4)
    stride = 1
    while num_layers // stride * per_layer > budget_bytes and stride < num_layers:
        stride += 1
    return list(range(0, num_layers, stride))


def run(args) -> int:
    from ..data.prompts import PromptConfig
    from ..data.sev import dataset_hash, select_skeletons
    from ..io import read_jsonl
    from ..models.adapters import Adapter
    from ..models.loader import load, model_source
    from ..discover import capture as cap
    from ..discover.consistency import (nearest_direction_accuracy, plot_consistency, plot_cross_layer, stability_report,
                              train_probe, write_report)
    from ..discover.directions import estimate
    from ..discover.distributed import init_from_env, rank_world

    distributed = init_from_env()  # under torchrun: the capture is sharded over the ranks

    if args.split == "test":
        raise ValueError("directions are discovered on the train split only; the test split stays held out "
                         "(it is used by --probe-split for evaluation)")
    model_source(args.model)
    out = opt.check_out_dir(args.out)
    opt.check_limit(args.split, args.limit)
    probe = args.probe_split.lower() != "none"
    if probe:
        opt.check_limit(args.probe_split, args.probe_limit, "--probe-limit")
    for flag, f in (("--accepted", args.accepted), ("--texts", args.texts)):
        if f:
            opt.check_in_file(f, flag)
    config = PromptConfig(preset=args.preset)
    config.system("anger")  # validates the preset early
    skeletons = select_skeletons(args.split, args.limit, args.select)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, tok = load(args.model, dtype=args.dtype)
    a = Adapter.of(model)
    dhash = dataset_hash(skeletons)

    if args.source == "prompt":
        accepted = cap.load_accepted_keys(args.accepted) if args.accepted else None
        units = cap.prompt_units(skeletons, accepted=accepted)
    elif args.accepted:
        rows = [r for r in read_jsonl(args.accepted) if cap.is_accepted(r)]
        ids = {s.skeleton_id for s in skeletons}
        rows = [r for r in rows if r.get("key", "").split("__")[0] in ids]
        units = cap.reply_text_units(rows, skeletons)
    else:
        refs = _load_texts(args.texts) if args.texts else cap.default_references()
        if args.texts_per_emotion:
            refs = {e: v[: args.texts_per_emotion] for e, v in refs.items()}
        units = cap.reference_text_units(skeletons, refs)
    if not units:
        raise ValueError("no units to capture: the split is empty or no judged row was accepted")

    prompt_train = cap.prompt_units(skeletons) if probe else []
    probe_layers = _auto_probe_layers(len(prompt_train), a.num_layers, a.hidden_size) if probe else []
    keep = probe_layers if (probe and args.source == "prompt" and not args.accepted) else False
    dirs, res = estimate(model, tok, units, source=args.source, model_name=str(args.model), prompt_config=config,
                         paper_final_norm=args.paper_final_norm, dataset_hash=dhash, batch_size=args.batch_size,
                         keep_states=keep, checkpoint=out / "capture_checkpoint", distributed=distributed)
    rank, world = rank_world()
    if rank != 0:
        return 0  # every rank holds the merged result; rank 0 writes it, the probe and the report
    dirs.extra.update(split=str(args.split), limit=args.limit, select=args.select, accepted=args.accepted,
                      dtype=opt.resolved_dtype_name(args.dtype), processes=world)
    path = dirs.save(out)
    print(f"directions: {path} ({dirs.n_groups} contexts, {len(res.keys)} units, {time.time() - t0:.1f}s)")

    probe_res = nearest = None
    if probe:
        if keep:
            train_states, train_y = res.states, res.labels()
        else:  # probe reads emotion-prompt readout states, whatever the direction source
            r = cap.capture(model, tok, prompt_train, prompt_config=config, batch_size=args.batch_size,
                            paper_final_norm=args.paper_final_norm, accumulate=False, keep_states=probe_layers)
            train_states, train_y = r.states, r.labels()
        held = select_skeletons(args.probe_split, args.probe_limit, args.select)
        held_ids = {s.skeleton_id for s in held}
        overlap = held_ids & {s.skeleton_id for s in skeletons}
        if overlap:
            raise ValueError(f"probe split shares skeletons with the discovery split: {sorted(overlap)[:5]}")
        rt = cap.capture(model, tok, cap.prompt_units(held), prompt_config=config, batch_size=args.batch_size,
                         paper_final_norm=args.paper_final_norm, accumulate=False, keep_states=probe_layers)
        probe_res = train_probe(train_states, train_y, rt.states, rt.labels(), steps=args.probe_steps)
        tables = dirs.directions[:, probe_layers]  # [P, L', E, d]
        nearest = nearest_direction_accuracy(rt.states, rt.labels(), rt.groups, tables)
    rep = stability_report(dirs, res.accumulator, probe=probe_res, nearest=nearest, probe_layers=probe_layers or None)
    rep.update(split=str(args.split), limit=args.limit, select=args.select, probe_split=args.probe_split if probe else None,
               probe_limit=args.probe_limit if probe else None, seconds=round(time.time() - t0, 1))
    j, md = write_report(rep, out)
    if not args.no_plots:
        plot_cross_layer(dirs, out, per_emotion=args.per_emotion_plots)
        plot_consistency(rep, out / "consistency.png")
    ck = out / "capture_checkpoint.safetensors"
    for f in (ck, ck.with_suffix(".json")):
        if f.exists():
            f.unlink()  # the run finished: the artifact replaces the checkpoint
    top = ", ".join(str(r["layer"]) for r in rep["ranking_mlp"][:5])
    print(f"report: {md} (most stable mlp layers: {top}); {time.time() - t0:.1f}s total", file=sys.stderr)
    opt.wrote(path, f"directions [2 points, {dirs.num_layers} layers, 6 emotions, d={dirs.hidden_size}]; report {md}")
    return 0
