"""Emotion judges and their reports: probes trained on the judge corpus (the default), zero-shot
MiniLM, LLM forced choice and yes/no, and an OpenAI-compatible HTTP judge.

``get_judge(name, **kwargs)`` (``name`` in ``JUDGES``, ``DEFAULT`` the measured best) returns a :class:`Judge` whose
``classify(texts, targets=None)`` gives one :class:`Judgement` (label, scores, match) per text.
"""
from .base import DEFAULT, JUDGES, LABELS, NEUTRAL, SECOND, Judge, Judgement, get_judge

__all__ = ["DEFAULT", "JUDGES", "LABELS", "NEUTRAL", "SECOND", "Judge", "Judgement", "get_judge"]
