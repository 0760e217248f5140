"""SEV data: the packaged train/test splits, their loader and validator, label vocabularies,
the judge reference set, prompt presets and generation.

Only the torch-free modules are imported here (``sev``, ``labels``, ``reference``); import
``prompts`` / ``generate`` (which need torch) explicitly.
"""
from .labels import EMOTION_WORDS, EMOTIONS, JUDGE_LABELS, VALENCES, check_emotions, check_valences, find_emotion_words
from .reference import JudgeReferenceRow, load_judge_reference
from .sev import (
    SPLITS,
    THEMES,
    SEVFormatError,
    Skeleton,
    UnitKey,
    dataset_hash,
    iter_units,
    load_split,
    make_key,
    parse_key,
    validate_records,
)

__all__ = [
    "EMOTIONS",
    "EMOTION_WORDS",
    "JUDGE_LABELS",
    "SPLITS",
    "THEMES",
    "VALENCES",
    "JudgeReferenceRow",
    "SEVFormatError",
    "Skeleton",
    "UnitKey",
    "check_emotions",
    "check_valences",
    "dataset_hash",
    "find_emotion_words",
    "iter_units",
    "load_judge_reference",
    "load_split",
    "make_key",
    "parse_key",
    "validate_records",
]
