"""SEV (Scenario-Event with Valence) data: skeletons, the packaged splits, loading and validation.

One JSONL line is one *skeleton* (METHOD.md §1.1)::

    {"skeleton_id": "work_00", "theme": "work",
     "scenario": "I submitted my quarterly budget report to my manager on Friday afternoon.",
     "event": {"positive": "...", "neutral": "...", "negative": "..."}}

A skeleton crossed with a valence is a *context* (the user message); a context crossed with a
target emotion is a *unit*, keyed ``"{skeleton_id}__{valence}__{emotion}"`` like the paper's
output rows. Two splits ship with the package, 8 themes x 20 skeletons each:

* ``train``: every discovery step (directions, components, circuits) reads only this split;
* ``test``: held out for evaluating prompting, steering and circuit modulation.

The texts were written for emokernels (the paper's files are not redistributed). Scenarios are
first-person and neutral; events state outcomes as facts and never name a feeling
(``labels.EMOTION_WORDS``), so the emotion in a reply comes from the model, not the prompt.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

from .labels import (
    EMOTION_WORDS,
    EMOTIONS,
    VALENCES,
    check_emotions,
    check_valences,
    find_emotion_words,
)

__all__ = [
    "EMOTIONS",
    "EMOTION_WORDS",
    "SPLITS",
    "THEMES",
    "VALENCES",
    "SEVFormatError",
    "Skeleton",
    "UnitKey",
    "check_emotions",
    "dataset_hash",
    "find_emotion_words",
    "iter_units",
    "load_split",
    "make_key",
    "parse_key",
    "select_skeletons",
    "split_path",
    "validate_records",
]

THEMES: tuple[str, ...] = (
    "work",  # work / job
    "school",  # school / academia
    "relation",  # personal relationships
    "shopping",  # customer service / shopping
    "administration",  # public services / administration
    "health",  # health / medical
    "living",  # housing / living facilities
    "travel",  # travel / transportation
)
SPLITS: tuple[str, ...] = ("train", "test")

# Separates the parts of a unit key; skeleton ids must not contain it or keys become ambiguous.
KEY_SEPARATOR = "__"

_REQUIRED_FIELDS = ("skeleton_id", "theme", "scenario", "event")


class SEVFormatError(ValueError):
    """A SEV file is malformed. The message names the file, the line number and the field."""


@dataclass(frozen=True)
class Skeleton:
    """One scenario with its three possible outcomes (one per valence)."""

    skeleton_id: str
    theme: str
    scenario: str
    # dicts are unhashable; leaving event out of the hash keeps Skeleton usable in sets/dicts.
    event: dict = field(hash=False)

    def user_message(self, valence: str) -> str:
        """The paper's user message for this skeleton at ``valence``: scenario, newline, event."""
        if valence not in self.event:
            check_valences(valence)  # raises naming the valid valences
            raise KeyError(f"skeleton {self.skeleton_id!r} has no {valence!r} event")
        return self.scenario + "\n" + self.event[valence]

    def to_record(self) -> dict:
        """The JSON record this skeleton was read from (field order as in the files)."""
        return {
            "skeleton_id": self.skeleton_id,
            "theme": self.theme,
            "scenario": self.scenario,
            "event": {v: self.event[v] for v in VALENCES},
        }


class UnitKey(NamedTuple):
    """The parts of a unit key ``"{skeleton_id}__{valence}__{emotion}"``."""

    skeleton_id: str
    valence: str
    emotion: str


def make_key(skeleton_id: str, valence: str, emotion: str) -> str:
    """The unit key used by generation, judging and capture rows."""
    return f"{skeleton_id}{KEY_SEPARATOR}{valence}{KEY_SEPARATOR}{emotion}"


def parse_key(key: str) -> UnitKey:
    """Split a unit key into ``(skeleton_id, valence, emotion)``; raises ``ValueError`` if malformed."""
    parts = key.split(KEY_SEPARATOR)
    if len(parts) != 3 or not all(parts):
        raise ValueError(
            f"malformed unit key {key!r}: expected 'skeleton_id{KEY_SEPARATOR}valence{KEY_SEPARATOR}emotion'"
        )
    skeleton_id, valence, emotion = parts
    check_valences(valence)
    check_emotions(emotion)
    return UnitKey(skeleton_id, valence, emotion)


def iter_units(
    skeletons: Iterable[Skeleton],
    emotions: Sequence[str] = EMOTIONS,
    valences: Sequence[str] = VALENCES,
) -> Iterator[tuple[Skeleton, str, str, str]]:
    """Yield ``(skeleton, valence, emotion, key)`` for every unit, skeleton-major.

    The order (skeleton, then valence, then emotion) matches the paper's generation loop, so
    row ``i`` of any per-unit artifact is the ``i``-th unit yielded here.
    """
    emotions = check_emotions(emotions)
    valences = check_valences(valences)
    for skeleton in skeletons:
        for valence in valences:
            for emotion in emotions:
                yield skeleton, valence, emotion, make_key(skeleton.skeleton_id, valence, emotion)


def _field_error(source: str, lineno: int, field_name: str, problem: str) -> SEVFormatError:
    return SEVFormatError(f"{source}: line {lineno}: field '{field_name}': {problem}")


def _check_text(value, source: str, lineno: int, field_name: str) -> str:
    if not isinstance(value, str):
        raise _field_error(source, lineno, field_name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _field_error(source, lineno, field_name, "empty text")
    return value


def _parse_record(record, source: str, lineno: int) -> Skeleton:
    if not isinstance(record, dict):
        raise SEVFormatError(f"{source}: line {lineno}: expected a JSON object, got {type(record).__name__}")
    for name in _REQUIRED_FIELDS:
        if name not in record:
            raise _field_error(source, lineno, name, "missing")
    skeleton_id = _check_text(record["skeleton_id"], source, lineno, "skeleton_id")
    if KEY_SEPARATOR in skeleton_id:
        raise _field_error(source, lineno, "skeleton_id", f"must not contain {KEY_SEPARATOR!r} (unit-key separator)")
    theme = _check_text(record["theme"], source, lineno, "theme")
    scenario = _check_text(record["scenario"], source, lineno, "scenario")
    event = record["event"]
    if not isinstance(event, dict):
        raise _field_error(source, lineno, "event", f"expected an object with keys {', '.join(VALENCES)}, got {type(event).__name__}")
    for valence in VALENCES:
        if valence not in event:
            raise _field_error(source, lineno, f"event.{valence}", "missing")
        _check_text(event[valence], source, lineno, f"event.{valence}")
    # Extra event keys are kept out: downstream code iterates VALENCES only.
    return Skeleton(skeleton_id, theme, scenario, {v: event[v] for v in VALENCES})


def validate_records(lines: Iterable[str], source: str = "<records>") -> list[Skeleton]:
    """Parse and validate SEV JSONL ``lines``; return the skeletons in file order.

    Blank lines are skipped (line numbers still count them). Raises :class:`SEVFormatError`
    naming ``source``, the 1-based line number and the field for: invalid JSON, a line that is
    not an object, a missing field, a non-string or empty text, a missing valence in ``event``,
    a ``skeleton_id`` containing ``"__"``, a duplicate ``skeleton_id``, or no records at all.
    Unknown extra fields are ignored, so user files may carry their own metadata.
    """
    skeletons: list[Skeleton] = []
    first_line_of: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SEVFormatError(f"{source}: line {lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        skeleton = _parse_record(record, source, lineno)
        if skeleton.skeleton_id in first_line_of:
            raise _field_error(
                source,
                lineno,
                "skeleton_id",
                f"duplicate id {skeleton.skeleton_id!r} (first on line {first_line_of[skeleton.skeleton_id]})",
            )
        first_line_of[skeleton.skeleton_id] = lineno
        skeletons.append(skeleton)
    if not skeletons:
        raise SEVFormatError(f"{source}: no records")
    return skeletons


def split_path(name: str):
    """The packaged file of split ``name`` (a ``Traversable``; a real path in a normal install)."""
    if name not in SPLITS:
        raise ValueError(f"unknown SEV split {name!r}; packaged splits: {', '.join(SPLITS)}")
    return resources.files(__package__).joinpath("sev", f"{name}.jsonl")


def load_split(name_or_path: str | os.PathLike, limit: int | None = None) -> list[Skeleton]:
    """Load SEV skeletons: ``"train"``/``"test"`` for the packaged splits, else a JSONL path.

    A ``Path`` is always read as a file, even one named ``train``. ``limit`` keeps the first
    ``limit`` skeletons in file order (for smoke runs); the whole file is still validated.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    if isinstance(name_or_path, str) and name_or_path in SPLITS:
        resource = split_path(name_or_path)
        source, text = f"sev/{name_or_path}.jsonl", resource.read_text(encoding="utf-8")
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"SEV file not found: {str(path)!r} (packaged splits: {', '.join(SPLITS)})"
            )
        from ..io import read_text_utf8

        source, text = str(path), read_text_utf8(path, SEVFormatError)  # bad bytes: the file, line and byte
    skeletons = validate_records(text.splitlines(), source)
    return skeletons if limit is None else skeletons[:limit]


def select_skeletons(split, limit: int | None, mode: str = "first") -> list:
    """``limit`` skeletons of ``split``: the first ones, or round-robin over themes (in file order
    within each theme) so that several themes are represented."""
    if mode == "first" or limit is None:
        return load_split(split, limit)
    if mode != "balanced":
        raise ValueError(f"unknown selection {mode!r}: use 'first' or 'balanced'")
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    by_theme: dict[str, list] = {}
    for s in load_split(split):
        by_theme.setdefault(s.theme, []).append(s)
    out, i = [], 0
    while len(out) < limit and any(i < len(v) for v in by_theme.values()):
        out += [v[i] for v in by_theme.values() if i < len(v)][: limit - len(out)]
        i += 1
    return out


def dataset_hash(skeletons: Iterable[Skeleton]) -> str:
    """Hex sha256 of the skeletons' canonical JSON, for artifact metadata.

    Canonical means sorted keys, no whitespace, UTF-8; record order counts (``limit`` and unit
    row order depend on it). Extra fields in user files do not enter the hash.
    """
    records = [s.to_record() for s in skeletons]
    canonical = json.dumps(records, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_judge_reference():
    """Hand-labelled judge reference replies; see :mod:`emokernels.data.reference`."""
    from .reference import load_judge_reference as _load

    return _load()
