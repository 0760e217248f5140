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
import time
from pathlib import Path

from ..judge.base import JUDGES, get_judge
from ..judge.rows import judge_rows
from . import options as opt

# probe.TRAINABLE's names (probe imports torch; tests check the two agree) and the calibrated LLM judge
TRAINABLE_NAMES = ("minilm-probe", "qwen0.5b-probe", "qwen1.5b-probe", "llm-yesno")


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
    from ..judge.report import write_report

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

    from ..judge.report import evaluate_on_reference

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
    from ..judge.evaluate import canary_check, evaluate_rows, markdown_summary
    from ..judge.report import evaluate_on_reference

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
    from ..judge.probe import train_judge

    if args.train == "llm-yesno":
        from ..data.corpus import corpus_hash, load_judge_corpus
        from ..io import write_json
        from ..judge.llm import LLMYesNoJudge, calibrate_yesno
        from ..judge.probe import weights_dir

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
    from ..judge.probe import artifact, weights_dir

    opt.wrote(artifact(args.out or weights_dir() / args.train), f"{args.train} weights and .json metadata")
    return 0
