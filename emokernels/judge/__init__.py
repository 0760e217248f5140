"""Emotion judges (MiniLM zero-shot, LLM forced choice, OpenAI-compatible HTTP) and their reports.

``get_judge("minilm"|"llm"|"http", **kwargs)`` returns a :class:`Judge` whose
``classify(texts, targets=None)`` gives one :class:`Judgement` (label, scores, match) per text.
"""
from .base import JUDGES, LABELS, NEUTRAL, Judge, Judgement, get_judge

__all__ = ["JUDGES", "LABELS", "NEUTRAL", "Judge", "Judgement", "get_judge"]
