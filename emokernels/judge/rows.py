"""Judge generation rows into a JSONL, resumable by key (what ``emokernels judge`` and the pipeline run).

Each output row = the generation row + ``label, scores, match, judge`` (+ ``second`` =
``{label, scores, match, judge}`` with a second judge). Rows are appended per batch, and keys
already in the output are skipped, so a killed run resumes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .base import Judge, JudgeUnavailableError

__all__ = ["judge_rows"]


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
