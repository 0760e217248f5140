"""The judge corpus: labelled assistant replies for training, calibrating and testing judges.

``judge_corpus.jsonl`` (packaged) holds replies in the voice of a chat assistant answering a
SEV-style situation, each labelled with one of the six emotions or ``"neutral"`` by reading it
(``docs/judge_rubric.md``), never by the emotion a generation condition targeted. Fields::

    {"id": "c3s07_fear_1", "scenario_id": "c3s07", "scenario": "<the user's message>",
     "valence": "negative", "label": "fear", "form": "question", "text": "<the reply>",
     "source": "written", "split": "train"}

* ``source``: ``"written"`` (written for emokernels) or ``"model:<model>/<condition>"`` for real
  replies of the project's own generation conditions (prompting, steering, circuit modulation on
  SEV *train* skeletons), labelled by a reader who was not shown the target;
* ``form``: how the emotion is carried (``FORMS``), so a judge can be scored per style;
* ``split``: ``train`` fits judges, ``dev`` calibrates them and chooses settings, ``test`` fits
  nothing. Splits are by scenario: every reply to one situation is in one split.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence

from .labels import JUDGE_LABELS, VALENCES

__all__ = ["CORPUS_SPLITS", "FORMS", "CorpusRow", "corpus_hash", "load_judge_corpus", "validate_corpus"]

CORPUS_SPLITS: tuple[str, ...] = ("train", "dev", "test")
FORMS: tuple[str, ...] = (
    "plain", "exclamation", "question", "sarcasm", "understatement", "long", "short", "fragment", "repetition",
    "caricature", "advice", "calm_positive", "courtesy", "mixed", "off_topic", "as_user", "generated",
)
_FILE = "judge_corpus.jsonl"
_FIELDS = ("id", "scenario_id", "scenario", "valence", "label", "form", "text", "source", "split")


@dataclass(frozen=True)
class CorpusRow:
    id: str
    scenario_id: str
    scenario: str
    valence: str
    label: str
    form: str
    text: str
    source: str
    split: str

    def to_dict(self) -> dict:
        return asdict(self)


def string_records(text: str, where: str, fields: tuple[str, ...], may_be_empty: tuple[str, ...] = ()) -> Iterator[tuple[str, dict]]:
    """``(location, record)`` for each non-blank JSONL line of a packaged data file, where every
    name in ``fields`` must be a string, non-blank unless in ``may_be_empty``. Raises ValueError
    naming ``where``, the line and the field."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        at = f"{where}: line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{at}: invalid JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{at}: expected a JSON object")
        for name in fields:
            value = record.get(name)
            if not isinstance(value, str) or (name not in may_be_empty and not value.strip()):
                raise ValueError(f"{at}: field {name!r}: missing, empty or not a string")
        yield at, record


def validate_corpus(rows: Sequence[CorpusRow], where: str = _FILE) -> None:
    """Raise ``ValueError`` naming the row for an unknown label, valence, form, split or source,
    a duplicate id, or a scenario that appears in two splits."""
    seen: set[str] = set()
    split_of: dict[str, tuple[str, str]] = {}
    for r in rows:
        at = f"{where}: row {r.id!r}"
        if r.id in seen:
            raise ValueError(f"{at}: duplicate id")
        seen.add(r.id)
        if r.label not in JUDGE_LABELS:
            raise ValueError(f"{at}: label {r.label!r} is not one of {', '.join(JUDGE_LABELS)}")
        if r.valence not in VALENCES:
            raise ValueError(f"{at}: valence {r.valence!r} is not one of {', '.join(VALENCES)}")
        if r.form not in FORMS:
            raise ValueError(f"{at}: form {r.form!r} is not one of {', '.join(FORMS)}")
        if r.split not in CORPUS_SPLITS:
            raise ValueError(f"{at}: split {r.split!r} is not one of {', '.join(CORPUS_SPLITS)}")
        if r.source != "written" and not (r.source.startswith("model:") and "/" in r.source):
            raise ValueError(f"{at}: source {r.source!r} is neither 'written' nor 'model:<model>/<condition>'")
        prev = split_of.setdefault(r.scenario_id, (r.split, r.id))
        if prev[0] != r.split:
            raise ValueError(f"{at}: scenario {r.scenario_id!r} is in split {r.split!r} here but in "
                             f"{prev[0]!r} at row {prev[1]!r}; a scenario belongs to one split")


def load_judge_corpus(split: str | Sequence[str] | None = None, path: str | Path | None = None) -> list[CorpusRow]:
    """Load and validate the packaged corpus (or ``path``), in file order; ``split`` keeps one
    split or several. Raises ``ValueError`` naming the file and line or row of any bad record."""
    if path is None:
        text, where = resources.files(__package__).joinpath(_FILE).read_text(encoding="utf-8"), _FILE
    else:
        from ..io import read_text_utf8

        path = Path(path)
        text, where = read_text_utf8(path), str(path)  # bad bytes: names the file, line and byte
    rows = [CorpusRow(**{k: rec[k] for k in _FIELDS}) for _, rec in string_records(text, where, _FIELDS, may_be_empty=("text",))]
    if not rows:
        raise ValueError(f"{where}: no rows")
    validate_corpus(rows, where)
    if split is None:
        return rows
    wanted = (split,) if isinstance(split, str) else tuple(split)
    bad = [s for s in wanted if s not in CORPUS_SPLITS]
    if bad:
        raise ValueError(f"unknown corpus split(s) {bad}: use {', '.join(CORPUS_SPLITS)}")
    return [r for r in rows if r.split in wanted]


def corpus_hash(rows: Sequence[CorpusRow]) -> str:
    """sha256 (first 16 hex) over the ids, labels, splits and texts: recorded with every trained judge."""
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r.id}\t{r.label}\t{r.split}\t{r.text}\n".encode())
    return h.hexdigest()[:16]


def summarise(rows: Sequence[CorpusRow]) -> dict:
    """Counts per split × label, per form and per source (for docs and the CLI)."""
    return {
        "n": len(rows),
        "by_split_label": {s: dict(Counter(r.label for r in rows if r.split == s)) for s in CORPUS_SPLITS},
        "by_form": dict(Counter(r.form for r in rows)),
        "by_source": dict(Counter(r.source for r in rows)),
        "scenarios": {s: len({r.scenario_id for r in rows if r.split == s}) for s in CORPUS_SPLITS},
    }
