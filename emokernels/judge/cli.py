"""``emokernels judge``: judge a generations JSONL (resumable by key) and write the report.

    emokernels judge --in generations.jsonl --judge minilm --out judged.jsonl [--second-judge llm]

Each output row = the generation row + ``label, scores, match, judge`` (+ ``second`` =
``{label, scores, match, judge}`` with ``--second-judge``). Rows are appended per batch, and
keys already in ``--out`` are skipped, so a killed run resumes. The report (JSON, Markdown,
confusion PNG) goes to ``--report-dir`` (default: ``<out stem>_report/`` beside ``--out``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

from ..io import append_jsonl, read_jsonl
from .base import JUDGES, Judge, get_judge


def judge_rows(rows: Sequence[dict], judge: Judge, out_path, *, second: Judge | None = None, batch_size: int = 32,
               resume: bool = True, progress: bool = True) -> list[dict]:
    """Judge generation ``rows`` (need ``key, text, emotion``) into ``out_path``; return all judged rows in input order."""
    from ..data.generate import truncate_torn_tail

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = list(rows)
    for i, r in enumerate(rows):
        for f in ("key", "text", "emotion"):
            if f not in r:
                raise ValueError(f"generation row {i} has no {f!r} field")
    keys = [r["key"] for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate keys in the generations")
    out_path = Path(out_path)
    if not resume and out_path.exists():
        out_path.unlink()
    truncate_torn_tail(out_path)
    jd, sd = judge.describe(), second.describe() if second is not None else None
    done = {}
    for r in read_jsonl(out_path):
        if r.get("judge") != jd or (r.get("second") or {}).get("judge") != sd:
            raise ValueError(f"{out_path} holds rows judged with other settings (row {r.get('key')!r}); use another --out or --no-resume")
        done[r["key"]] = r
    todo = [r for r in rows if r["key"] not in done]

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), unit="row", desc=f"judge[{judge.name}{'+' + second.name if second else ''}]",
               disable=not progress, dynamic_ncols=True)
    try:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            texts, targets = [r["text"] for r in chunk], [r["emotion"] for r in chunk]
            first = judge.classify(texts, targets)
            other = second.classify(texts, targets) if second is not None else [None] * len(chunk)
            out = []
            for r, j1, j2 in zip(chunk, first, other):
                row = {**r, "label": j1.label, "scores": j1.scores, "match": j1.match, "judge": jd}
                if j1.reason:
                    row["reason"] = j1.reason
                if j2 is not None:
                    row["second"] = {"label": j2.label, "scores": j2.scores, "match": j2.match, "judge": sd,
                                     **({"reason": j2.reason} if j2.reason else {})}
                out.append(row)
            append_jsonl(out_path, out)
            done.update((r["key"], r) for r in out)
            bar.update(len(chunk))
    finally:
        bar.close()
    return [done[k] for k in keys]


def register(subparsers) -> None:
    p = subparsers.add_parser("judge", help="judge generations (minilm | llm | http) and write accuracy tables",
                              description="Label each generated reply with an emotion judge; resumable by key.")
    p.add_argument("--in", dest="inp", default=None, help="generations JSONL (from `emokernels generate`)")
    p.add_argument("--judge", default="minilm", choices=JUDGES)
    p.add_argument("--second-judge", default=None, choices=JUDGES, help="a second judge, for agreement")
    p.add_argument("--out", default=None, help="judged JSONL (appended to; resumable)")
    p.add_argument("--reference", action="store_true",
                   help="instead of --in/--out: score the judge(s) on the hand-labelled reference set and print JSON")
    p.add_argument("--report-dir", default=None, help="report folder (default: <out stem>_report beside --out)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True, help="skip keys already in --out (default) or start over")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from .report import write_report

    if args.reference:
        return _reference(args)
    if not args.inp or not args.out:
        raise ValueError("--in and --out are required (or use --reference)")
    inp = Path(args.inp)
    if not inp.is_file():
        raise FileNotFoundError(f"no generations file at {inp}")
    if args.second_judge == args.judge:
        raise ValueError("--second-judge must differ from --judge")
    rows = read_jsonl(inp)
    if not rows:
        raise ValueError(f"{inp} holds no rows")
    t0 = time.perf_counter()
    judge = get_judge(args.judge)
    second = get_judge(args.second_judge) if args.second_judge else None
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    judged = judge_rows(rows, judge, args.out, second=second, batch_size=args.batch_size, resume=args.resume,
                        progress=not args.no_progress)
    t_judge = time.perf_counter() - t0
    out = Path(args.out)
    report_dir = Path(args.report_dir) if args.report_dir else out.with_name(out.stem + "_report")
    rep = write_report(judged, report_dir)
    o = rep["accuracy"]["overall"]
    msg = f"{len(judged)} rows judged -> {out}; accuracy {o['hits']}/{o['n']}"
    if "agreement" in rep:
        a = rep["agreement"]["label"]
        msg += f"; label agreement {a['rate']:.3f} (kappa {a['kappa']:.3f})"
    print(msg + f"; report in {report_dir} (judge load {t_load:.1f} s, judging {t_judge:.1f} s)")
    return 0


def _reference(args) -> int:
    import json

    from .report import evaluate_on_reference

    results = {}
    for name in filter(None, (args.judge, args.second_judge)):
        res = evaluate_on_reference(get_judge(name), batch_size=args.batch_size)
        res.pop("errors")
        results[name] = res
    text = json.dumps(results, indent=1)
    if args.out:
        from ..io import write_json

        write_json(args.out, results)
    print(text)
    return 0
