"""The report of ``emokernels run``: ``report.md`` (what a person reads), ``report.json`` and plots."""
from __future__ import annotations

from pathlib import Path

from .io import atomic_write_bytes, read_json, write_json

CONDITIONS = ("prompt", "steering", "circuit")


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _acc(table: dict, *path):
    node = table
    for p in path:
        node = (node or {}).get(p)
    return None if node is None else node.get("accuracy")


def _ci(cell: dict | None) -> str:
    """``acc % [lo–hi] (k/n)`` with the 95 % Wilson interval."""
    from .judge.evaluate import wilson

    if not cell or not cell.get("n"):
        return "–"
    lo, hi = wilson(cell["hits"], cell["n"])
    return f"{_pct(cell['accuracy'])} [{_pct(lo)}–{_pct(hi)}] ({cell['hits']}/{cell['n']})"


def headline_markdown(comp: dict) -> list[str]:
    """One row per condition: accuracy with its 95 % interval under each judge, their agreement."""
    conds = [c for c in CONDITIONS if c in comp]
    rep0 = comp[conds[0]]["report"]
    j1 = (rep0.get("judge") or {}).get("name", "judge")
    j2 = ((rep0.get("second") or {}).get("judge") or {}).get("name")
    head = f"| condition | strength | {j1}: accuracy [95 % CI] (hits/n) | {j1}: natural |"
    if j2:
        head += f" {j2}: accuracy [95 % CI] (hits/n) | {j2}: natural | both judges hit | label agreement (κ) |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for c in conds:
        rep, nat, s = comp[c]["report"], comp[c]["naturalness"], comp[c].get("strength")
        row = (f"| {c} | {'–' if s is None else f'{s:.3g}'} | **{_ci(rep['accuracy']['overall'])}** | "
               f"{_pct(nat.get('natural_accuracy'))} |")
        if j2 and "second" in rep:
            ag = rep["agreement"]
            row += (f" **{_ci(rep['second']['accuracy']['overall'])}** | {_pct(nat.get('natural_accuracy_second'))} | "
                    f"{_pct(ag['both_match'])} | {_pct(ag['label']['rate'])} ({ag['label']['kappa']:.2f}) |")
        lines.append(row)
    return lines


def comparison_markdown(comp: dict) -> list[str]:
    conds = [c for c in CONDITIONS if c in comp]
    emos = list(comp[conds[0]]["report"]["accuracy"]["by_emotion"])
    vals = list(comp[conds[0]]["report"]["accuracy"]["by_valence"])
    lines = ["| condition | strength | overall | natural | " + " | ".join(emos) + " | " + " | ".join(vals)
             + " | degenerate | caricature | distinct-2 | perplexity |",
             "|---" * (8 + len(emos) + len(vals)) + "|"]
    for c in conds:
        acc = comp[c]["report"]["accuracy"]
        nat = comp[c]["naturalness"]
        s = comp[c].get("strength")
        lines.append(
            f"| {c} | {'–' if s is None else f'{s:.3g}'} | **{_pct(_acc(acc, 'overall'))}** | "
            f"**{_pct(nat.get('natural_accuracy'))}** | "
            + " | ".join(_pct(_acc(acc, "by_emotion", e)) for e in emos) + " | "
            + " | ".join(_pct(_acc(acc, "by_valence", v)) for v in vals)
            + f" | {_pct(nat.get('degenerate'))} | {_pct(nat.get('caricature'))} | {nat.get('distinct2', 0):.3f} | "
            + (f"{nat['perplexity']:.1f}" if isinstance(nat.get("perplexity"), (int, float)) else "–") + " |")
    return lines


def plot_comparison(comp: dict, path: Path) -> Path:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = [c for c in CONDITIONS if c in comp]
    emos = list(comp[conds[0]]["report"]["accuracy"]["by_emotion"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    w = 0.8 / len(conds)
    for i, c in enumerate(conds):
        accs = [(_acc(comp[c]["report"]["accuracy"], "by_emotion", e) or 0) * 100 for e in emos]
        ax.bar([j + i * w for j in range(len(emos))], accs, w, label=c)
    ax.set_xticks([j + w * (len(conds) - 1) / 2 for j in range(len(emos))], emos)
    ax.set_ylabel("judged accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title("test split: prompting vs steering vs circuit modulation")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_run_report(out: Path, state: dict, seconds: float) -> Path:
    out = Path(out)
    cfg = state.get("config", {})
    lines = [f"# emokernels run — {cfg.get('model')}", "",
             f"Stages done: {', '.join(state.get('done', []))}. Wall time of this invocation: {seconds:.0f} s; "
             f"per stage (s): {state.get('timings', {})}.", "",
             "Config: " + ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("func",)), ""]
    info = state.get("info", {})
    if "judge" in info:
        lines += [f"Prompt-elicited accuracy on the train subset (judge {cfg.get('judge')}): "
                  f"{_pct(info['judge'].get('accuracy'))} %.", ""]
    sel = out / "select" / "selection.json"
    if sel.exists():
        s = read_json(sel)
        lines += ["## Strength selection (train split only)", "",
                  "Chosen by natural accuracy: judged hits that are neither degenerate nor emotion-word caricatures; "
                  f"judge: {(s.get('judge') or {}).get('name', cfg.get('judge'))}.", "",
                  "| setting | accuracy | natural accuracy | degenerate | caricature |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {_pct(v['accuracy'])} | {_pct(v.get('natural_accuracy'))} | {_pct(v['degenerate'])} | "
                  f"{_pct(v.get('caricature'))} |" for k, v in s["table"].items()]
        lines += ["", f"Chosen: {s['chosen']}", ""]
    comp_path = out / "compare" / "comparison.json"
    if comp_path.exists():
        comp = read_json(comp_path)
        lines += ["## Test split: prompting vs steering vs circuit modulation", "",
                  "Same precision and decoding for all three, every reply read by two different judges; accuracy in %, "
                  "95 % Wilson intervals. *natural* counts only hits that are neither degenerate nor caricatures "
                  "(3+ emotion words making up >12 % of the reply).", ""]
        lines += headline_markdown(comp)
        lines += ["", "Per emotion and valence, first judge:", ""]
        lines += comparison_markdown(comp)
        lines += ["", "Example replies (first test rows per condition):", ""]
        for c in CONDITIONS:
            f = out / "compare" / f"{c}_judged.jsonl"
            if f.exists():
                from .io import read_jsonl

                seen = set()
                for r in read_jsonl(f):
                    if r["emotion"] in seen:
                        continue
                    seen.add(r["emotion"])
                    text = r["text"].replace("\n", " ")[:160]
                    lines.append(f"- **{c}**, target {r['emotion']}, judged {r['label']}: {text}")
        plot_comparison(comp, out / "comparison.png")
        lines += ["", "![comparison](comparison.png)", ""]
    comp_summary = out / "components" / "summary.json"
    if comp_summary.exists():
        lines += ["## Top components", "", "See `components/summary.json` and the heatmaps in `components/`.", ""]
    write_json(out / "report.json", {"state": state, "seconds": seconds})
    return atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())
