"""SEV splits, their loader/validator, and the judge reference set. Fast, no model, no torch."""
from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from emokernels.data.labels import EMOTIONS, JUDGE_LABELS, VALENCES, check_emotions, find_emotion_words
from emokernels.data.reference import load_judge_reference
from emokernels.data.sev import (
    THEMES,
    SEVFormatError,
    Skeleton,
    dataset_hash,
    iter_units,
    load_split,
    parse_key,
    validate_records,
)

# Above this word 3-shingle Jaccard similarity two texts count as near duplicates.
NEAR_DUPLICATE_JACCARD = 0.5


@pytest.fixture(scope="module")
def splits() -> dict[str, list[Skeleton]]:
    return {name: load_split(name) for name in ("train", "test")}


def _texts(skeleton: Skeleton) -> dict[str, str]:
    return {"scenario": skeleton.scenario, **{f"event.{v}": skeleton.event[v] for v in VALENCES}}


def _shingles(text: str, k: int = 3) -> frozenset[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return frozenset(tuple(words[i : i + k]) for i in range(len(words) - k + 1))


def _jaccard(a: frozenset, b: frozenset) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 0.0


def _max_similarity(pairs) -> tuple[float, str, str]:
    return max(((_jaccard(a[1], b[1]), a[0], b[0]) for a, b in pairs), default=(0.0, "", ""))


# --------------------------------------------------------------------------- packaged splits


@pytest.mark.parametrize("name", ["train", "test"])
def test_split_shape(splits, name):
    skeletons = splits[name]
    assert len(skeletons) == 160
    assert Counter(s.theme for s in skeletons) == {theme: 20 for theme in THEMES}
    assert len({s.skeleton_id for s in skeletons}) == 160
    infix = "_test_" if name == "test" else "_"
    for theme in THEMES:
        ids = [s.skeleton_id for s in skeletons if s.theme == theme]
        assert ids == [f"{theme}{infix}{i:02d}" for i in range(20)]
    for s in skeletons:
        assert set(s.event) == set(VALENCES)
        assert all(text.strip() for text in _texts(s).values()), s.skeleton_id


@pytest.mark.parametrize("name", ["train", "test"])
def test_texts_name_no_emotion(splits, name):
    offending = [
        f"{s.skeleton_id} {field}: {words}"
        for s in splits[name]
        for field, text in _texts(s).items()
        if (words := find_emotion_words(text))
    ]
    assert not offending, "texts must state facts, not feelings:\n" + "\n".join(offending)


@pytest.mark.parametrize("name", ["train", "test"])
def test_text_lengths(splits, name):
    # Scenario and each event: one sentence of 10-20 words (METHOD.md §1.1 means: 13-16 / 17).
    too_short_or_long = [
        f"{s.skeleton_id} {field}: {len(text.split())} words"
        for s in splits[name]
        for field, text in _texts(s).items()
        if not 10 <= len(text.split()) <= 20
    ]
    assert not too_short_or_long, "\n".join(too_short_or_long)


def test_no_scenario_shared_between_splits(splits):
    train = {s.scenario.strip().lower() for s in splits["train"]}
    test = {s.scenario.strip().lower() for s in splits["test"]}
    assert not train & test


@pytest.mark.parametrize(
    "text_of",
    [lambda s: s.scenario, lambda s: s.scenario + " " + s.event["positive"]],
    ids=["scenario", "scenario+positive"],
)
def test_no_near_duplicates(splits, text_of):
    shingled = {
        name: [(s.skeleton_id, _shingles(text_of(s))) for s in skeletons] for name, skeletons in splits.items()
    }
    checks = {
        "train x test": itertools.product(shingled["train"], shingled["test"]),
        "within train": itertools.combinations(shingled["train"], 2),
        "within test": itertools.combinations(shingled["test"], 2),
    }
    for where, pairs in checks.items():
        similarity, a, b = _max_similarity(pairs)
        assert similarity < NEAR_DUPLICATE_JACCARD, f"{where}: {a} and {b} are near duplicates ({similarity:.2f})"


def test_user_message(splits):
    skeleton = splits["train"][0]
    assert skeleton.user_message("negative") == skeleton.scenario + "\n" + skeleton.event["negative"]
    with pytest.raises(ValueError, match="valid valences"):
        skeleton.user_message("mixed")


def test_iter_units_and_keys(splits):
    skeletons = splits["train"][:2]
    units = list(iter_units(skeletons))
    assert len(units) == 2 * len(VALENCES) * len(EMOTIONS)
    skeleton, valence, emotion, key = units[0]
    assert (skeleton.skeleton_id, valence, emotion) == (skeletons[0].skeleton_id, VALENCES[0], EMOTIONS[0])
    assert key == f"{skeleton.skeleton_id}__{valence}__{emotion}"
    assert all(parse_key(k) == (s.skeleton_id, v, e) for s, v, e, k in units)
    assert len({k for *_, k in units}) == len(units)
    assert len(list(iter_units(skeletons, emotions=["fear"], valences=["neutral"]))) == 2
    with pytest.raises(ValueError, match="joy"):
        list(iter_units(skeletons, emotions=["joy"]))
    for bad in ("work_00__positive", "work_00__positive__joy", "work_00__mixed__anger", "a__b__c__d"):
        with pytest.raises(ValueError):
            parse_key(bad)


# --------------------------------------------------------------------------- user files, validator


def _record(skeleton_id="a_00", **overrides) -> dict:
    record = {
        "skeleton_id": skeleton_id,
        "theme": "work",
        "scenario": "I sent the report to my manager.",
        "event": {"positive": "She approved it.", "neutral": "She filed it.", "negative": "She rejected it."},
    }
    record.update(overrides)
    return record


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_load_user_file_and_limit(tmp_path):
    path = _write_jsonl(tmp_path / "mine.jsonl", [_record(f"a_{i:02d}", extra="kept out") for i in range(5)] + [""])
    skeletons = load_split(path)
    assert [s.skeleton_id for s in skeletons] == [f"a_{i:02d}" for i in range(5)]
    assert load_split(str(path), limit=2) == skeletons[:2]
    assert len(load_split("train", limit=3)) == 3
    assert load_split("test", limit=0) == []
    with pytest.raises(ValueError):
        load_split(path, limit=-1)
    with pytest.raises(FileNotFoundError, match="train, test"):
        load_split(tmp_path / "missing.jsonl")


def _message_of(tmp_path: Path, lines: list) -> str:
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(SEVFormatError) as info:
        load_split(path)
    message = str(info.value)
    assert "bad.jsonl" in message
    return message


def test_validator_bad_json(tmp_path):
    message = _message_of(tmp_path, [_record("a_00"), _record("a_01"), '{"skeleton_id": "a_02", "theme": '])
    assert "line 3" in message and "invalid JSON" in message


def test_validator_missing_valence(tmp_path):
    record = _record("a_01")
    del record["event"]["negative"]
    message = _message_of(tmp_path, [_record("a_00"), record])
    assert "line 2" in message and "event.negative" in message and "missing" in message


def test_validator_wrong_type(tmp_path):
    message = _message_of(tmp_path, [_record("a_00", scenario=42)])
    assert "line 1" in message and "'scenario'" in message and "int" in message


def test_validator_duplicate_id(tmp_path):
    message = _message_of(tmp_path, [_record("a_00"), _record("a_01"), _record("a_00")])
    assert "line 3" in message and "skeleton_id" in message and "duplicate" in message and "line 1" in message


@pytest.mark.parametrize(
    "record, field",
    [
        ({k: v for k, v in _record().items() if k != "theme"}, "'theme'"),
        (_record(event="good"), "'event'"),
        (_record(event={"positive": "a", "neutral": "  ", "negative": "c"}), "event.neutral"),
        (_record("bad__id"), "skeleton_id"),
        (["not", "an", "object"], "JSON object"),
    ],
)
def test_validator_other_errors(tmp_path, record, field):
    message = _message_of(tmp_path, ["", record])
    assert "line 2" in message and field in message


def test_validator_empty_file():
    with pytest.raises(SEVFormatError, match="no records"):
        validate_records(["", "  "], "empty.jsonl")


def test_dataset_hash(splits):
    skeletons = splits["test"][:4]
    digest = dataset_hash(skeletons)
    assert len(digest) == 64 and digest == dataset_hash(list(skeletons))
    assert digest == dataset_hash(validate_records([json.dumps(s.to_record()) for s in skeletons]))
    first = skeletons[0]
    edited = Skeleton(first.skeleton_id, first.theme, first.scenario, {**first.event, "neutral": "Something else."})
    assert dataset_hash([edited, *skeletons[1:]]) != digest
    assert dataset_hash(skeletons[::-1]) != digest
    assert dataset_hash(splits["train"]) != dataset_hash(splits["test"])


# --------------------------------------------------------------------------- labels


def test_check_emotions():
    assert check_emotions(["anger", "fear"]) == ("anger", "fear")
    assert check_emotions("disgust") == ("disgust",)
    with pytest.raises(ValueError, match="joy") as info:
        check_emotions(["anger", "joy"])
    assert "happiness" in str(info.value)  # lists the valid ones
    with pytest.raises(ValueError, match="duplicate"):
        check_emotions(["anger", "anger"])
    with pytest.raises(ValueError):
        check_emotions([])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She was FURIOUS and felt sad.", ["furious", "felt", "sad"]),
        ("He feels worried; they panicked, angrily and sadder.", ["feels", "worried", "panicked", "angrily", "sadder"]),
        ("Feelings, hopefully, upsetting surprises, terribly loving.", ["feelings", "hopefully", "upsetting", "surprises", "terribly", "loving"]),
        ("The garage had average madam ragged feed glass and enjoyment.", []),
    ],
)
def test_find_emotion_words(text, expected):
    assert find_emotion_words(text) == expected


# --------------------------------------------------------------------------- judge reference


def test_judge_reference():
    rows = load_judge_reference()
    counts = Counter(row.label for row in rows)
    assert set(counts) == set(JUDGE_LABELS)
    assert all(counts[label] >= 24 for label in JUDGE_LABELS), counts
    assert len({row.id for row in rows}) == len(rows)
    for label in EMOTIONS:
        cues = Counter(row.cue for row in rows if row.label == label)
        assert cues["explicit"] >= 12 and cues["implicit"] >= 12, (label, cues)
    assert sum(row.cue == "advice" for row in rows) >= 12  # calm help about bad events
    for row in rows:
        words = find_emotion_words(row.text)
        # explicit rows name a feeling; implicit and neutral rows must not, or they test nothing
        assert bool(words) == (row.cue == "explicit"), (row.id, words)
        assert 3 <= len(row.text.split()) <= 40, row.id
