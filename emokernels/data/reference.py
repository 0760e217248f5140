"""Hand-labelled replies for checking a judge before trusting it on generated text.

``judge_reference.jsonl`` holds short assistant-style replies (one or two sentences, as a model
would answer a SEV scenario + event), each labelled with one of the six emotions or
``"neutral"``. Fields::

    {"id": "anger_01", "text": "...", "label": "anger", "cue": "explicit"}

``cue`` says how the label is carried, so a judge can be scored on the hard cases separately:

* ``"explicit"``: the reply names the emotion ("I'm furious on your behalf");
* ``"implicit"``: it expresses it without any emotion word ("How dare they charge you for
  their own mistake?");
* ``"advice"`` (neutral only): calm, practical help about a *bad* event. Weak judges call
  these anger or sadness because the content is negative; the tone is not;
* ``"plain"`` (neutral only): a matter-of-fact reply to an ordinary event.

Surprise rows are written to be told apart from happiness and fear: they react to the
unexpectedness itself ("Wait, really? I never would have guessed that!").
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from .corpus import string_records
from .labels import JUDGE_LABELS, NEUTRAL_LABEL

__all__ = ["CUES", "JudgeReferenceRow", "load_judge_reference"]

CUES: tuple[str, ...] = ("explicit", "implicit", "advice", "plain")
_NEUTRAL_CUES = ("advice", "plain")
_EMOTION_CUES = ("explicit", "implicit")
_FILE = "judge_reference.jsonl"


@dataclass(frozen=True)
class JudgeReferenceRow:
    """One labelled reply: ``label`` is an emotion from ``EMOTIONS`` or ``"neutral"``."""

    id: str
    text: str
    label: str
    cue: str


def load_judge_reference() -> list[JudgeReferenceRow]:
    """Load and validate the packaged reference set, in file order.

    Raises ``ValueError`` naming the line and field for malformed rows, unknown labels or cues,
    a cue that does not fit the label, and duplicate ids.
    """
    text = resources.files(__package__).joinpath(_FILE).read_text(encoding="utf-8")
    rows: list[JudgeReferenceRow] = []
    seen: set[str] = set()
    for where, record in string_records(text, _FILE, ("id", "text", "label", "cue")):
        label, cue = record["label"], record["cue"]
        if label not in JUDGE_LABELS:
            raise ValueError(f"{where}: field 'label': {label!r} is not one of {', '.join(JUDGE_LABELS)}")
        allowed = _NEUTRAL_CUES if label == NEUTRAL_LABEL else _EMOTION_CUES
        if cue not in allowed:
            raise ValueError(f"{where}: field 'cue': {cue!r} does not fit label {label!r}; use {', '.join(allowed)}")
        if record["id"] in seen:
            raise ValueError(f"{where}: field 'id': duplicate id {record['id']!r}")
        seen.add(record["id"])
        rows.append(JudgeReferenceRow(record["id"], record["text"], label, cue))
    return rows
