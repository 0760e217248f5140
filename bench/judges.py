"""Judge quality and speed, side by side, one machine: every judge on the judge corpus test split,
on the hand-labelled reference set and on the four canary replies of issue 14.

    python bench/judges.py --judges minilm-probe,qwen0.5b-probe,minilm

Results go to bench/results/judges-<date>.md and .json (accuracy with its 95 % Wilson interval,
macro-F1, per-label F1, the 7×7 confusion, accuracy per form and per source, load time and
seconds per reply), with the date, commit and versions.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from emokernels.data.corpus import corpus_hash, load_judge_corpus  # noqa: E402
from emokernels.io import atomic_write_bytes, write_json  # noqa: E402
from emokernels.judge import get_judge  # noqa: E402
from emokernels.judge.evaluate import canary_check, evaluate_rows, markdown_summary  # noqa: E402
from emokernels.judge.report import evaluate_on_reference  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judges", default="minilm-probe,qwen0.5b-probe,minilm")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=None, help="results stem (default bench/results/judges-<date>)")
    a = ap.parse_args(argv)
    date = _dt.date.today().isoformat()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    stem = Path(a.out) if a.out else Path(__file__).parent / "results" / f"judges-{date}"
    rows = load_judge_corpus()
    test = [r for r in rows if r.split == "test"]
    header = (f"Machine: {os.cpu_count()}-core CPU, torch {torch.__version__}, transformers {transformers.__version__}; "
              f"date {date}, commit {commit}; corpus {corpus_hash(rows)} ({len(test)} test replies of {len(rows)})")
    results, md = {"header": header, "judges": {}}, [f"# Judges on the judge corpus test split\n\n{header}\n"]
    summary = ["| judge | accuracy [95 % CI] | macro-F1 | reference set (182) | canaries | ms / reply | load s |",
               "|---|---|---|---|---|---|---|"]
    for name in a.judges.split(","):
        t0 = time.perf_counter()
        judge = get_judge(name)
        load_s = time.perf_counter() - t0
        res = evaluate_rows(judge, test, batch_size=a.batch_size)
        ref = evaluate_on_reference(judge, batch_size=a.batch_size)
        can = canary_check(judge)
        results["judges"][name] = {"corpus_test": res, "reference": {k: ref[k] for k in ("n", "accuracy", "hits", "confusion")},
                                   "canaries": can, "load_seconds": round(load_s, 1)}
        acc = res["accuracy"]
        summary.append(f"| {name} | {100 * acc['rate']:.1f} [{100 * acc['ci95'][0]:.1f}–{100 * acc['ci95'][1]:.1f}] | "
                       f"{res['macro_f1']:.3f} | {100 * ref['accuracy']:.1f} | {can['named']}/{can['n']} | "
                       f"{1000 * res['seconds_per_reply']:.1f} | {load_s:.1f} |")
        md.append(markdown_summary(name, res))
        forms = res.get("accuracy_by_form", {})
        md.append("Accuracy by form: " + ", ".join(f"{k} {100 * v['rate']:.0f} % ({v['n']})" for k, v in forms.items()) + "\n")
        srcs = res.get("accuracy_by_source", {})
        md.append("Accuracy by source: " + ", ".join(f"{k} {100 * v['rate']:.0f} % ({v['n']})" for k, v in srcs.items()) + "\n")
        print(summary[-1], flush=True)
        del judge
    md.insert(1, "\n".join(summary) + "\n")
    write_json(stem.with_suffix(".json"), results)
    atomic_write_bytes(stem.with_suffix(".md"), "\n".join(md).encode())
    print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
