"""Judge interface shared by every emotion judge.

A judge maps replies to one label of ``LABELS`` = the six emotions + ``"neutral"``:

    classify(texts: list[str], targets: list[str] | None) -> list[Judgement]

``Judgement.scores`` holds the judge's score per label (what the numbers mean depends on the
judge: cosine similarity for MiniLM, softmax probability over the 7 label tokens for the LLM
judge, the binary match for the HTTP judge). ``match`` is ``label == target`` when a target is
given, else ``None``. These offline judges are much weaker than the paper's GPT-4o-mini
(MODELS.md §6): compare conditions under one judge, not absolute numbers with the paper.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Sequence

from ..data.labels import JUDGE_LABELS, NEUTRAL_LABEL

NEUTRAL = NEUTRAL_LABEL
LABELS: tuple[str, ...] = JUDGE_LABELS  # the six emotions (paper order) + "neutral"


class JudgeUnavailableError(RuntimeError):
    """A judge could not give a verdict (e.g. the HTTP endpoint is down after its retries)."""


@dataclass
class Judgement:
    label: str
    scores: dict[str, float] = field(default_factory=dict)
    match: bool | None = None
    reason: str | None = None  # free text (HTTP judge) or an error message

    def to_dict(self) -> dict:
        return asdict(self)


def check_targets(texts: Sequence[str], targets: Sequence[str] | None, allowed: Sequence[str] = LABELS) -> None:
    """Raise ValueError if ``targets`` does not line up with ``texts`` or names an unknown label."""
    if isinstance(texts, str):
        raise TypeError("classify() takes a list of texts, not one string")
    if targets is None:
        return
    if len(targets) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(targets)} targets")
    bad = sorted({t for t in targets if t not in allowed})
    if bad:
        raise ValueError(f"unknown target label(s) {bad}: use one of {list(allowed)}")


def with_matches(labels_scores: list[tuple[str, dict]], targets: Sequence[str] | None) -> list[Judgement]:
    out = []
    for i, (label, scores) in enumerate(labels_scores):
        match = None if targets is None else (label == targets[i])
        out.append(Judgement(label=label, scores=scores, match=match))
    return out


class Judge(ABC):
    """Base class: subclasses set ``name`` and implement ``classify``."""

    name: str = "judge"
    labels: tuple[str, ...] = LABELS

    @abstractmethod
    def classify(self, texts: Sequence[str], targets: Sequence[str] | None = None) -> list[Judgement]:
        ...

    def describe(self) -> dict:
        """Settings recorded next to every judged row (``judge`` field)."""
        return {"name": self.name}

    def __call__(self, texts, targets=None):
        return self.classify(texts, targets)


# name -> what it is; the trained probes read weights packaged in ``judge/weights``.
JUDGES: dict[str, str] = {
    "minilm-probe": "calibrated softmax probe over frozen MiniLM embeddings, trained on the judge corpus",
    "qwen0.5b-probe": "calibrated softmax probe over Qwen2.5-Coder-0.5B hidden states, trained on the judge corpus",
    "qwen1.5b-probe": "calibrated softmax probe over Qwen2.5-Coder-1.5B hidden states, trained on the judge corpus",
    "minilm": "zero-shot: cosine of MiniLM embeddings to hand-written label prototypes",
    "llm": "zero-shot: Qwen2.5-Coder-1.5B forced choice over the 7 labels",
    "llm-yesno": "Qwen2.5-Coder-1.5B, the paper's per-target yes/no question, threshold calibrated on the corpus",
    "http": "any OpenAI-compatible endpoint, the paper's per-target question",
}
# Chosen by measurement on the judge corpus (docs/judges.md): quality first, then speed.
DEFAULT = "qwen0.5b-probe"
# A different judge (other features, 8x faster, weaker): picks strengths in `emokernels run`, and
# gives every comparison its second reading.
SECOND = "minilm-probe"


def get_judge(name: str, **kwargs) -> Judge:
    """The judge called ``name`` (``JUDGES``; ``DEFAULT`` is the measured best); kwargs go to its constructor."""
    if name == "minilm":
        from .minilm import MiniLMJudge

        return MiniLMJudge(**kwargs)
    if name == "llm":
        from .llm import LLMJudge

        return LLMJudge(**kwargs)
    if name == "llm-yesno":
        from .llm import LLMYesNoJudge

        return LLMYesNoJudge(**kwargs)
    if name == "http":
        from .http import HTTPJudge

        return HTTPJudge(**kwargs)
    if name in JUDGES:
        from .probe import ProbeJudge

        return ProbeJudge(name, **kwargs)
    raise ValueError(f"unknown judge {name!r}: use one of {', '.join(JUDGES)}")
