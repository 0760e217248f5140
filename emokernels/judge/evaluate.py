"""How good is a judge? Accuracy with a Wilson interval, macro-F1 and the 7×7 confusion on labelled rows.

For n labelled replies with k correct, the 95 % Wilson score interval (z = 1.96) is

    centre = (k + z²/2) / (n + z²),   half = z √(k(n−k)/n + z²/4) / (n + z²)

Per label y: precision P = TP/(TP+FP), recall R = TP/(TP+FN), F1 = 2PR/(P+R); macro-F1 is their
mean over the 7 labels. The confusion C[p][t] counts rows predicted p with true label t.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Sequence

from .base import LABELS
from .report import confusion_matrix

# The four replies a strong external judge and every careful reader label as their target (issue 14,
# paraphrased there); the default judge must name each one.
CANARIES: tuple[tuple[str, str], ...] = (
    ("Oh no, what if the paperwork is wrong and they won't let you board?", "fear"),
    ("Are you seriously unable to get a simple e-reader working?!", "anger"),
    ("Ugh, what a total failure, how could anyone be so careless with the food?", "disgust"),
    ("I'm shocked the clinic got your results back so fast!", "surprise"),
)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95 % Wilson score interval of a proportion k/n (None when n = 0)."""
    if n == 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return (max(0.0, centre - half), min(1.0, centre + half))


def proportion(k: int, n: int) -> dict:
    """``{k, n, rate, ci95}`` of a count."""
    ci = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else None, "ci95": None if ci is None else [round(ci[0], 4), round(ci[1], 4)]}


def classification_metrics(pred: Sequence[str], gold: Sequence[str], labels: Sequence[str] = LABELS) -> dict:
    """Accuracy (with interval), per-label precision/recall/F1, macro-F1 and confusion."""
    if len(pred) != len(gold):
        raise ValueError(f"got {len(pred)} predictions but {len(gold)} gold labels")
    n = len(gold)
    per = {}
    for y in labels:
        tp = sum(p == y and g == y for p, g in zip(pred, gold))
        fp = sum(p == y and g != y for p, g in zip(pred, gold))
        fn = sum(p != y and g == y for p, g in zip(pred, gold))
        P = tp / (tp + fp) if tp + fp else 0.0
        R = tp / (tp + fn) if tp + fn else 0.0
        per[y] = {"precision": round(P, 4), "recall": round(R, 4), "f1": round(2 * P * R / (P + R) if P + R else 0.0, 4),
                  "support": tp + fn}
    present = [y for y in labels if per[y]["support"] or any(p == y for p in pred)]
    rl, cl, counts = confusion_matrix(list(pred), list(gold), labels=labels, target_labels=labels)
    return {"n": n, "accuracy": proportion(sum(p == g for p, g in zip(pred, gold)), n),
            "macro_f1": round(sum(per[y]["f1"] for y in present) / len(present), 4) if present else None,
            "per_label": per, "confusion": {"rows_predicted": rl, "cols_true": cl, "counts": counts}}


def evaluate_rows(judge, rows: Sequence, batch_size: int = 32, groups: Sequence[str] = ("form", "source")) -> dict:
    """Score ``judge`` on labelled rows (objects with ``text`` and ``label``, e.g. ``CorpusRow``):
    metrics, accuracy per value of each ``groups`` attribute, seconds per reply, the wrong rows."""
    rows = list(rows)
    texts, gold = [r.text for r in rows], [r.label for r in rows]
    t0 = time.perf_counter()
    pred = []
    for i in range(0, len(texts), batch_size):
        pred.extend(j.label for j in judge.classify(texts[i : i + batch_size]))
    dt = time.perf_counter() - t0
    res = {"judge": judge.describe(), **classification_metrics(pred, gold), "seconds_per_reply": round(dt / max(len(rows), 1), 5)}
    for g in groups:
        by = defaultdict(lambda: [0, 0])
        for r, p in zip(rows, pred):
            key = getattr(r, g, None)
            if key is None:
                continue
            by[key][0] += p == r.label
            by[key][1] += 1
        if by:
            res[f"accuracy_by_{g}"] = {k: proportion(*v) for k, v in sorted(by.items())}
    res["errors"] = [{"id": getattr(r, "id", i), "label": r.label, "predicted": p, "text": r.text}
                     for i, (r, p) in enumerate(zip(rows, pred)) if p != r.label]
    return res


def canary_check(judge) -> dict:
    """Which of ``CANARIES`` the judge labels as their target."""
    out = judge.classify([t for t, _ in CANARIES])
    return {"named": sum(j.label == y for j, (_, y) in zip(out, CANARIES)), "n": len(CANARIES),
            "labels": [{"text": t, "target": y, "predicted": j.label} for j, (t, y) in zip(out, CANARIES)]}


def markdown_summary(name: str, res: dict) -> str:
    """A judge's evaluation as Markdown: headline, per-label table and confusion."""
    a = res["accuracy"]
    lines = [f"### {name}: accuracy {100 * a['rate']:.1f} % (95 % CI {100 * a['ci95'][0]:.1f}–{100 * a['ci95'][1]:.1f}, "
             f"n = {a['n']}), macro-F1 {res['macro_f1']:.3f}, {1000 * res['seconds_per_reply']:.1f} ms/reply\n",
             "| label | precision | recall | F1 | n |", "|---|---|---|---|---|"]
    for y, v in res["per_label"].items():
        lines.append(f"| {y} | {v['precision']:.2f} | {v['recall']:.2f} | {v['f1']:.2f} | {v['support']} |")
    c = res["confusion"]
    lines += ["", "Confusion (rows: predicted, columns: true):", "", "| | " + " | ".join(c["cols_true"]) + " |",
              "|---" * (len(c["cols_true"]) + 1) + "|"]
    lines += [f"| {lab} | " + " | ".join(map(str, row)) + " |" for lab, row in zip(c["rows_predicted"], c["counts"])]
    return "\n".join(lines) + "\n"
