"""``emokernels judge``: judge a generations JSONL (resumable by key) and write the report.

    emokernels judge --in generations.jsonl --out judged.jsonl [--judge NAME] [--second-judge NAME]
    emokernels judge --evaluate [--judge NAME]     quality on the judge corpus test split
    emokernels judge --train minilm-probe           retrain a packaged probe judge (train + dev splits)

Each output row = the generation row + ``label, scores, match, judge`` (+ ``second`` =
``{label, scores, match, judge}`` with ``--second-judge``). Rows are appended per batch, and
keys already in ``--out`` are skipped, so a killed run resumes. The report (JSON, Markdown,
confusion PNG) goes to ``--report-dir`` (default: ``<out stem>_report/`` beside ``--out``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

from .. import options as opt
from .base import JUDGES, Judge, JudgeUnavailableError, get_judge

# probe.TRAINABLE's names (probe imports torch; tests check the two agree) and the calibrated LLM judge
TRAINABLE_NAMES = ("minilm-probe", "qwen0.5b-probe", "qwen1.5b-probe", "llm-yesno")


def _failed(row: dict) -> bool:
    return row.get("label") == "error" or (row.get("second") or {}).get("label") == "error"


def judge_rows(rows: Sequence[dict], judge: Judge, out_path, *, second: Judge | None = None, batch_size: int = 32,
               resume: bool = True, progress: bool = True) -> list[dict]:
    """Judge generation ``rows`` (need ``key, text, emotion``) into ``out_path``; return all judged rows in input order.

    A verdict the judge could not give (label ``"error"``: an endpoint down after its retries) is
    never stored: the run stops with ``JudgeUnavailableError`` and those rows stay pending, so
    the same call judges them later. Error rows left by older versions are dropped on resume.
    ``out_path`` has one writer at a time (:class:`~emokernels.io.OutputLockedError` otherwise);
    duplicated keys in the generations or in ``out_path`` raise
    :class:`~emokernels.io.DuplicateKeyError` naming the keys and the repair."""
    from ..io import check_unique_keys, exclusive_output

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = list(rows)
    for i, r in enumerate(rows):
        for f in ("key", "text", "emotion"):
            if f not in r:
                raise ValueError(f"generation row {i} has no {f!r} field")
    check_unique_keys(rows)
    out_path = Path(out_path)
    with exclusive_output(out_path):
        return _judge_locked(rows, judge, out_path, second, batch_size, resume, progress)


def _judge_locked(rows, judge, out_path, second, batch_size, resume, progress):
    from ..data.generate import truncate_torn_tail
    from ..io import append_jsonl, read_jsonl

    keys = [r["key"] for r in rows]
    if not resume and out_path.exists():
        out_path.unlink()
    truncate_torn_tail(out_path)
    done, stored = {}, read_jsonl(out_path, unique_key="key")
    jd, sd = judge.describe(), second.describe() if second is not None else None
    for r in stored:
        if r.get("judge") != jd or (r.get("second") or {}).get("judge") != sd:
            raise ValueError(f"{out_path} holds rows judged with other settings (row {r.get('key')!r}); use another --out or --no-resume")
        if not _failed(r):
            done[r["key"]] = r
    if len(done) < len(stored):  # drop stored errors, so they are judged again and never read as verdicts
        from ..io import atomic_write_bytes

        atomic_write_bytes(out_path, "".join(json.dumps(r) + "\n" for r in stored if not _failed(r)).encode())
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
            good = [r for r in out if not _failed(r)]
            append_jsonl(out_path, good)
            done.update((r["key"], r) for r in good)
            bar.update(len(chunk))
            if len(good) < len(out):
                bad = next(r for r in out if _failed(r))
                reason = bad.get("reason") or (bad.get("second") or {}).get("reason")
                raise JudgeUnavailableError(
                    f"{len(out) - len(good)} row(s) could not be judged (e.g. {bad['key']!r}: {reason}); "
                    f"{len(keys) - len(done)} row(s) stay pending in {out_path}: rerun the same command when the judge is back")
    finally:
        bar.close()
    return [done[k] for k in keys]


def register(subparsers) -> None:
    p = subparsers.add_parser("judge", help="judge generations and write accuracy tables; evaluate or train judges",
                              description=__doc__ + "\nJudges:\n" + "\n".join(f"  {k}: {v}" for k, v in JUDGES.items()),
                              formatter_class=opt.HelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--in", dest="inp", default=None, help="generations JSONL (from `emokernels generate`); needs --out")
    mode.add_argument("--evaluate", action="store_true",
                      help="instead of --in: print the judge's quality on the judge corpus test split (and the reference set)")
    mode.add_argument("--train", default=None, choices=TRAINABLE_NAMES,
                      help="instead of --in: train this probe judge on the corpus train split, calibrate on dev, "
                           "and write it to --out (default: the packaged weights)")
    mode.add_argument("--reference", action="store_true",
                      help="instead of --in: score the judge(s) on the hand-labelled reference set and print JSON "
                           "(also written to --out if given)")
    opt.add_judge(p)
    opt.add_judge(p, "--second-judge", default=None, help="a second, different judge, for agreement")
    opt.add_out(p, "file", required=False, help="with --in: judged JSONL (appended to; resumable); "
                                                "with --evaluate/--reference: results JSON; with --train: weights")
    p.add_argument("--report-dir", default=None, help="report folder (default: <out stem>_report beside --out)")
    opt.add_batch_size(p, 16, help="replies per judge call")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True, help="skip keys already in --out, or start over")
    opt.add_progress(p)
    p.set_defaults(func=_main)


def _main(args) -> int:
    if args.second_judge == args.judge:
        raise ValueError("--second-judge must differ from --judge")
    if args.out:
        opt.check_out_file(args.out)
    if args.reference:
        return _reference(args)
    if args.evaluate:
        return _evaluate(args)
    if args.train:
        return _train(args)
    if not args.inp or not args.out:
        raise ValueError("--in and --out are required (or use --evaluate, --train or --reference)")
    from ..io import read_jsonl
    from .report import write_report

    inp = Path(args.inp)
    if not inp.is_file():
        raise FileNotFoundError(f"no generations file at {inp}")
    out = Path(args.out)
    if out.resolve() == inp.resolve():
        raise ValueError(f"--out {out} is the --in file; judged rows go to another file")
    report_dir = opt.check_out_dir(args.report_dir, "--report-dir") if args.report_dir else out.with_name(out.stem + "_report")
    rows = read_jsonl(inp, unique_key="key")
    if not rows:
        raise ValueError(f"{inp} holds no rows")
    t0 = time.perf_counter()
    judge = get_judge(args.judge)
    second = get_judge(args.second_judge) if args.second_judge else None
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    judged = judge_rows(rows, judge, out, second=second, batch_size=args.batch_size, resume=args.resume,
                        progress=not args.no_progress)
    t_judge = time.perf_counter() - t0
    rep = write_report(judged, report_dir)
    o = rep["accuracy"]["overall"]
    msg = f"accuracy {o['hits']}/{o['n']}"
    if "agreement" in rep:
        a = rep["agreement"]["label"]
        msg += f"; label agreement {a['rate']:.3f} (kappa {a['kappa']:.3f})"
    print(msg + f"; report in {report_dir} (judge load {t_load:.1f} s, judging {t_judge:.1f} s)")
    opt.wrote(out, f"{len(judged)} rows")
    return 0


def _reference(args) -> int:
    import json

    from .report import evaluate_on_reference

    results = {}
    for name in filter(None, (args.judge, args.second_judge)):
        res = evaluate_on_reference(get_judge(name), batch_size=args.batch_size)
        res.pop("errors")
        results[name] = res
    print(json.dumps(results, indent=1))
    if args.out:
        from ..io import write_json

        write_json(args.out, results)
        opt.wrote(args.out, f"reference-set scores of {', '.join(results)}")
    return 0


def _evaluate(args) -> int:
    import json

    from ..data.corpus import load_judge_corpus
    from .evaluate import canary_check, evaluate_rows, markdown_summary
    from .report import evaluate_on_reference

    test = load_judge_corpus("test")
    results = {}
    for name in filter(None, (args.judge, args.second_judge)):
        judge = get_judge(name)
        res = evaluate_rows(judge, test, batch_size=args.batch_size)
        ref = evaluate_on_reference(judge, batch_size=args.batch_size)
        results[name] = {"corpus_test": res, "reference": {k: ref[k] for k in ("n", "accuracy", "hits", "confusion")},
                         "canaries": canary_check(judge)}
        print(markdown_summary(f"{name} on the corpus test split", res))
        print(f"reference set: accuracy {ref['accuracy']:.3f} (n = {ref['n']}); canaries named: "
              f"{results[name]['canaries']['named']}/{results[name]['canaries']['n']}\n")
    if args.out:
        from ..io import write_json

        write_json(args.out, results)
        opt.wrote(args.out, f"corpus test and reference scores of {', '.join(results)}")
    else:
        print(json.dumps({k: {"accuracy": v["corpus_test"]["accuracy"], "macro_f1": v["corpus_test"]["macro_f1"]}
                          for k, v in results.items()}))
    return 0


def _train(args) -> int:
    from .probe import train_judge

    if args.train == "llm-yesno":
        from ..data.corpus import corpus_hash, load_judge_corpus
        from ..io import write_json
        from .llm import LLMYesNoJudge, calibrate_yesno
        from .probe import weights_dir

        judge = LLMYesNoJudge(threshold=0.0, batch_size=args.batch_size)
        res = {**calibrate_yesno(judge, load_judge_corpus("dev")), "corpus_hash": corpus_hash(load_judge_corpus())}
        out = args.out or weights_dir() / "llm-yesno.json"
        write_json(out, res)
        print(f"calibrated llm-yesno: threshold {res['threshold']:.3f}, dev balanced accuracy {res['balanced_accuracy']:.3f}")
        opt.wrote(out, "llm-yesno calibration")
        return 0
    meta = train_judge(args.train, out=args.out, progress=not args.no_progress)
    print(f"trained {args.train}: dev macro-F1 {meta['dev_macro_f1']:.3f}, λ={meta['lambda']:g}, "
          f"T={meta.get('temperature', 1.0):.3g}")
    from .probe import artifact, weights_dir

    opt.wrote(artifact(args.out or weights_dir() / args.train), f"{args.train} weights and .json metadata")
    return 0
