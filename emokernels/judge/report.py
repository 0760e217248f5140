"""Accuracy tables, confusion matrices and judge agreement from judged rows.

A judged row is a generation row (``key, emotion`` = target, ``valence``, ``text``...) plus the
judge's ``label``, ``scores``, ``match`` and ``judge``; an optional ``second`` holds a second
judge's ``{label, scores, match, judge}``.

* accuracy = #match / #judged, overall, per target emotion, per valence and per emotion ×
  valence (METHOD §2; rows whose ``match`` is None are not counted);
* confusion C[y, e] = #rows with predicted label y and target e; rows y ∈ the 7 judge labels
  (+ any other label a judge emitted, e.g. "other"/"error" from the HTTP judge), columns the
  6 emotions;
* agreement of two judges: rate p_o = mean(label_a == label_b) and Cohen's
  κ = (p_o − p_e) / (1 − p_e) with p_e = Σ_y p_a(y) p_b(y) (κ = 1 when p_e = 1 and p_o = 1).
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from ..data.labels import EMOTIONS, VALENCES
from ..io import write_json
from .base import LABELS


def _acc(rows: list[dict]) -> dict:
    judged = [r for r in rows if r.get("match") is not None]
    hits = sum(bool(r["match"]) for r in judged)
    return {"n": len(judged), "hits": hits, "accuracy": hits / len(judged) if judged else None}


def accuracy_table(rows: Sequence[dict]) -> dict:
    """``{"overall", "by_emotion", "by_valence", "by_emotion_valence"}`` of ``{n, hits, accuracy}``."""
    rows = list(rows)
    by_e, by_v, by_ev = defaultdict(list), defaultdict(list), defaultdict(list)
    for r in rows:
        by_e[r["emotion"]].append(r)
        if "valence" in r:
            by_v[r["valence"]].append(r)
            by_ev[(r["emotion"], r["valence"])].append(r)
    emos = [e for e in EMOTIONS if e in by_e] + sorted(set(by_e) - set(EMOTIONS))
    vals = [v for v in VALENCES if v in by_v] + sorted(set(by_v) - set(VALENCES))
    return {
        "overall": _acc(rows),
        "by_emotion": {e: _acc(by_e[e]) for e in emos},
        "by_valence": {v: _acc(by_v[v]) for v in vals},
        "by_emotion_valence": {e: {v: _acc(by_ev[(e, v)]) for v in vals if (e, v) in by_ev} for e in emos},
    }


def confusion_matrix(predicted: Sequence[str], targets: Sequence[str], labels: Sequence[str] = LABELS,
                     target_labels: Sequence[str] = EMOTIONS) -> tuple[list[str], list[str], list[list[int]]]:
    """``(row_labels, col_labels, counts)`` with counts[i][j] = #(predicted = row i, target = col j).

    Rows: ``labels`` plus any extra predicted label seen; columns: ``target_labels`` plus any
    extra target seen (e.g. "neutral" on the judge reference set).
    """
    if len(predicted) != len(targets):
        raise ValueError(f"got {len(predicted)} predictions but {len(targets)} targets")
    rows = list(labels) + sorted(set(predicted) - set(labels))
    cols = list(target_labels) + sorted(set(targets) - set(target_labels))
    ri, ci = {l: i for i, l in enumerate(rows)}, {l: j for j, l in enumerate(cols)}
    counts = [[0] * len(cols) for _ in rows]
    for p, t in zip(predicted, targets):
        counts[ri[p]][ci[t]] += 1
    return rows, cols, counts


def agreement(labels_a: Sequence, labels_b: Sequence) -> dict:
    """Raw agreement rate and Cohen's kappa of two label sequences (labels or match booleans)."""
    if len(labels_a) != len(labels_b):
        raise ValueError(f"got {len(labels_a)} and {len(labels_b)} labels")
    n = len(labels_a)
    if n == 0:
        return {"n": 0, "rate": None, "kappa": None}
    p_o = sum(a == b for a, b in zip(labels_a, labels_b)) / n
    ca, cb = Counter(labels_a), Counter(labels_b)
    p_e = sum(ca[y] * cb[y] for y in set(ca) | set(cb)) / (n * n)
    kappa = 1.0 if p_e == 1 and p_o == 1 else (p_o - p_e) / (1 - p_e) if p_e < 1 else 0.0
    return {"n": n, "rate": p_o, "kappa": kappa}


def _second(rows: list[dict]) -> list[dict]:
    """Rows re-expressed with the second judge's verdict in place of the first's."""
    return [{**r, **{k: r["second"][k] for k in ("label", "scores", "match", "judge") if k in r["second"]}}
            for r in rows if r.get("second")]


def build_report(rows: Iterable[dict]) -> dict:
    """All tables of one judged run (and of the second judge and the agreement, if present)."""
    rows = list(rows)
    if not rows:
        raise ValueError("no judged rows to report on")
    missing = [r.get("key", "?") for r in rows if "label" not in r or "emotion" not in r]
    if missing:
        raise ValueError(f"{len(missing)} row(s) lack 'label' or 'emotion' (e.g. {missing[0]!r}): judge them first")
    rl, cl, counts = confusion_matrix([r["label"] for r in rows], [r["emotion"] for r in rows])
    rep = {
        "n_rows": len(rows),
        "judge": rows[0].get("judge"),
        "accuracy": accuracy_table(rows),
        "confusion": {"rows_predicted": rl, "cols_target": cl, "counts": counts},
        "predicted_label_counts": dict(Counter(r["label"] for r in rows)),
    }
    second = _second(rows)
    if second:
        rl2, cl2, counts2 = confusion_matrix([r["label"] for r in second], [r["emotion"] for r in second])
        both = [r for r in rows if r.get("second")]
        rep["second"] = {
            "judge": second[0].get("judge"),
            "accuracy": accuracy_table(second),
            "confusion": {"rows_predicted": rl2, "cols_target": cl2, "counts": counts2},
        }
        rep["agreement"] = {
            "label": agreement([r["label"] for r in both], [r["second"]["label"] for r in both]),
            "match": agreement([bool(r["match"]) for r in both], [bool(r["second"]["match"]) for r in both]),
            "both_match": sum(bool(r["match"]) and bool(r["second"]["match"]) for r in both) / len(both),
        }
    return rep


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def markdown(rep: dict) -> str:
    """Markdown tables of a report from :func:`build_report`."""
    lines = []

    def block(title: str, part: dict):
        acc, conf = part["accuracy"], part["confusion"]
        o = acc["overall"]
        lines.append(f"## {title}\n")
        lines.append(f"Overall accuracy: **{_pct(o['accuracy'])} %** ({o['hits']}/{o['n']})\n")
        vals = list(acc["by_valence"])
        lines.append("| emotion | " + " | ".join(vals) + " | all |")
        lines.append("|---" * (len(vals) + 2) + "|")
        for e, cell in acc["by_emotion"].items():
            ev = acc["by_emotion_valence"].get(e, {})
            lines.append(f"| {e} | " + " | ".join(_pct(ev[v]["accuracy"]) if v in ev else "–" for v in vals)
                         + f" | {_pct(cell['accuracy'])} ({cell['hits']}/{cell['n']}) |")
        lines.append("| all | " + " | ".join(f"{_pct(acc['by_valence'][v]['accuracy'])}" for v in vals) + f" | {_pct(o['accuracy'])} |\n")
        lines.append("Confusion (rows: predicted label, columns: target emotion):\n")
        lines.append("| predicted \\ target | " + " | ".join(conf["cols_target"]) + " |")
        lines.append("|---" * (len(conf["cols_target"]) + 1) + "|")
        for lab, row in zip(conf["rows_predicted"], conf["counts"]):
            lines.append(f"| {lab} | " + " | ".join(str(c) for c in row) + " |")
        lines.append("")

    j = rep.get("judge") or {}
    lines.append(f"# Judge report ({rep['n_rows']} rows)\n")
    block(f"Judge: {j.get('name', '?') if isinstance(j, dict) else j}", rep)
    if "second" in rep:
        j2 = rep["second"].get("judge") or {}
        block(f"Second judge: {j2.get('name', '?') if isinstance(j2, dict) else j2}", rep["second"])
        ag = rep["agreement"]
        lines.append("## Agreement\n")
        lines.append("| on | n | rate | Cohen's κ |\n|---|---|---|---|")
        for k in ("label", "match"):
            a = ag[k]
            lines.append(f"| {k} | {a['n']} | {_pct(a['rate'])} % | {a['kappa']:.3f} |" if a["kappa"] is not None else f"| {k} | 0 | – | – |")
        lines.append(f"\nBoth judges say match: {_pct(ag['both_match'])} %\n")
    return "\n".join(lines)


def plot_confusion(conf: dict, path: str | os.PathLike, title: str = "") -> Path:
    """Heat map of a confusion matrix (PNG), counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..io import atomic_write_bytes

    m = np.array(conf["counts"], dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * m.shape[1], 1.0 + 0.6 * m.shape[0]))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(m.shape[1]), conf["cols_target"], rotation=30, ha="right")
    ax.set_yticks(range(m.shape[0]), conf["rows_predicted"])
    ax.set_xlabel("target emotion")
    ax.set_ylabel("predicted label")
    hi = m.max() if m.size else 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", color="white" if m[i, j] > hi / 2 else "black", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    import io as _io

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_report(rows: Iterable[dict], out_dir: str | os.PathLike) -> dict:
    """Write ``report.json``, ``report.md`` and ``confusion[_second].png`` into ``out_dir``; return the report."""
    from ..io import atomic_write_bytes

    out_dir = Path(out_dir)
    rep = build_report(rows)
    write_json(out_dir / "report.json", rep)
    atomic_write_bytes(out_dir / "report.md", markdown(rep).encode())
    name = (rep.get("judge") or {}).get("name", "judge") if isinstance(rep.get("judge"), dict) else "judge"
    plot_confusion(rep["confusion"], out_dir / "confusion.png", title=f"{name}: predicted vs target")
    if "second" in rep:
        n2 = (rep["second"].get("judge") or {}).get("name", "second") if isinstance(rep["second"].get("judge"), dict) else "second"
        plot_confusion(rep["second"]["confusion"], out_dir / "confusion_second.png", title=f"{n2}: predicted vs target")
    return rep


def evaluate_on_reference(judge, rows=None, batch_size: int = 16) -> dict:
    """Score ``judge`` on the hand-labelled reference set (7-way, neutral included).

    Returns accuracy, accuracy per cue, hits per label, the 7×7 confusion (rows predicted,
    columns true), seconds per reply (wall clock, batches of ``batch_size``) and the wrong rows.
    """
    from ..data.reference import load_judge_reference
    from .evaluate import evaluate_rows

    rows = load_judge_reference() if rows is None else list(rows)
    res = evaluate_rows(judge, rows, batch_size=batch_size, groups=("cue",))
    counts = res["confusion"]["counts"]  # square over LABELS: the diagonal holds the hits
    hits = {l: [counts[i][i], res["per_label"][l]["support"]] for i, l in enumerate(LABELS) if res["per_label"][l]["support"]}
    six = [hits[e] for e in EMOTIONS if e in hits]
    return {
        "judge": res["judge"],
        "n": res["n"],
        "accuracy": res["accuracy"]["rate"],
        "accuracy_six_way_rows": sum(h for h, _ in six) / sum(n for _, n in six) if six else None,
        "hits": hits,
        "accuracy_by_cue": {c: v["rate"] for c, v in res["accuracy_by_cue"].items()},
        "confusion": {"rows_predicted": res["confusion"]["rows_predicted"], "cols_target": res["confusion"]["cols_true"],
                      "counts": counts},
        "seconds_per_reply": res["seconds_per_reply"],
        "errors": res["errors"],
    }
