"""Label vocabularies: the six target emotions, the three event valences, and emotion words.

The order of ``EMOTIONS`` is the paper's code order (METHOD.md §0); it fixes loop order and the
row order of every per-emotion table, so it must not change.

``EMOTION_WORDS`` lists words that *name* a feeling. The SEV scenarios and events must state
facts only ("the landlord kept the deposit"), never feelings ("I was furious"): if the user
message already names an emotion, a model that "expresses" it may just be copying the word.
"""
from __future__ import annotations

import re
from typing import Iterable

EMOTIONS: tuple[str, ...] = ("anger", "sadness", "happiness", "fear", "surprise", "disgust")
VALENCES: tuple[str, ...] = ("positive", "neutral", "negative")

# Label for text that expresses no particular emotion (judge reference set, judge outputs).
NEUTRAL_LABEL = "neutral"
JUDGE_LABELS: tuple[str, ...] = EMOTIONS + (NEUTRAL_LABEL,)


def _check_names(names: Iterable[str] | str, valid: tuple[str, ...], kind: str) -> tuple[str, ...]:
    # A bare string would otherwise be iterated character by character.
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names:
        raise ValueError(f"no {kind}s given; valid {kind}s: {', '.join(valid)}")
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(
            f"unknown {kind}(s): {', '.join(map(repr, unknown))}; valid {kind}s: {', '.join(valid)}"
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate {kind}(s): {', '.join(map(repr, duplicates))}")
    return names


def check_emotions(names: Iterable[str] | str) -> tuple[str, ...]:
    """Return ``names`` as a tuple if every one is a known emotion, in the order given.

    Raises ``ValueError`` naming each unknown emotion and listing the valid ones, or naming
    duplicates. A single string is treated as one name.
    """
    return _check_names(names, EMOTIONS, "emotion")


def check_valences(names: Iterable[str] | str) -> tuple[str, ...]:
    """Like :func:`check_emotions`, for event valences."""
    return _check_names(names, VALENCES, "valence")


# Words that name an emotion or a feeling: the six labels, their adjective/adverb forms and
# common synonyms. Matching is whole-word and case-insensitive; ``find_emotion_words`` also
# undoes simple inflections, so "feels", "worried" or "panicked" are caught without listing them.
EMOTION_WORDS: frozenset[str] = frozenset(
    """
    anger angry angered furious fury rage mad annoyed irritated frustrated frustrating
    sad sadness unhappy sorrow grief depressed miserable
    happy happiness happily glad joy joyful delighted pleased thrilled excited exciting cheerful
    afraid scared frightened fear fearful terrified anxious nervous worried worry panic
    surprise surprised surprising astonished shocked shocking amazed amazing unexpected unexpectedly
    disgust disgusted disgusting gross revolting
    upset relieved disappointed disappointing proud ashamed embarrassed lonely hopeful
    love hate feel feeling felt emotion emotional wonderful terrible awful horrible
    """.split()
)

_WORD = re.compile(r"[a-z]+")


def _base_forms(word: str) -> list[str]:
    """Candidate base forms of a lower-case word under simple English inflection.

    Over-generating is cheap (a candidate only matters if it is in ``EMOTION_WORDS``); the rules
    avoid adding an ``e`` after a doubled consonant so that "ragged" does not become "rage".
    """
    forms = [word]

    def add_stem(stem: str, restore_e: bool) -> None:
        if len(stem) < 2:
            return
        forms.append(stem)
        if stem.endswith("ck"):  # panicked -> panic
            forms.append(stem[:-1])
        if len(stem) >= 3 and stem[-1] == stem[-2] and stem[-1] not in "aeiouls":
            forms.append(stem[:-1])  # sadder -> sad, upsetting -> upset
        elif restore_e:
            forms.append(stem + "e")  # loving -> love

    if word.endswith("ies") or word.endswith("ied"):
        forms.append(word[:-3] + "y")  # worries, worried -> worry
    if word.endswith("ier") or word.endswith("ily"):
        forms.append(word[:-3] + "y")  # angrier, angrily -> angry
    if word.endswith("iest"):
        forms.append(word[:-4] + "y")
    if word.endswith("s"):
        forms.append(word[:-1])
    if word.endswith("es"):
        forms.append(word[:-2])
    if word.endswith("ness"):
        add_stem(word[:-4], restore_e=False)  # madness -> mad
    if word.endswith("ly"):
        add_stem(word[:-2], restore_e=False)  # emotionally -> emotional
        forms.append(word[:-1] + "e")  # terribly -> terrible
    if word.endswith("ed"):
        forms.append(word[:-1])  # loved -> love
        add_stem(word[:-2], restore_e=False)  # feared -> fear
    if word.endswith("ing"):
        add_stem(word[:-3], restore_e=True)  # feeling -> feel, hating -> hate
    if word.endswith("er"):
        add_stem(word[:-2], restore_e=False)  # madder -> mad
    if word.endswith("est"):
        add_stem(word[:-3], restore_e=False)
    return forms


def find_emotion_words(text: str) -> list[str]:
    """Words of ``text`` that name an emotion, as they appear (lower-cased), in text order.

    Whole-word and case-insensitive; simple inflections (-s, -es, -ed, -ing, -ly, -ness,
    -er, -est, y -> ies/ied/ily/ier) of any word in ``EMOTION_WORDS`` count too.
    Apostrophes split words, so "mother's" is read as "mother" + "s".
    """
    return [
        word
        for word in _WORD.findall(text.lower())
        if any(form in EMOTION_WORDS for form in _base_forms(word))
    ]
