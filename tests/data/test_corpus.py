"""The judge corpus: the packaged file's size, balance and splits, and the loader's validation."""
import json
from collections import Counter

import pytest

from emokernels.data.corpus import CORPUS_SPLITS, corpus_hash, load_judge_corpus, summarise
from emokernels.data.labels import JUDGE_LABELS


def _row(**kw):
    r = {"id": "c1s00_anger_1", "scenario_id": "c1s00", "scenario": "I sent the form.", "valence": "neutral",
         "label": "anger", "form": "plain", "text": "How dare they!", "source": "written", "split": "train"}
    r.update(kw)
    return r


def _write(tmp_path, rows, name="c.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_packaged_corpus_size_balance_and_splits():
    rows = load_judge_corpus()
    counts = Counter(r.label for r in rows)
    assert len(rows) >= 1400 and all(counts[l] >= 200 for l in JUDGE_LABELS), counts
    split_of = {}
    for r in rows:
        assert split_of.setdefault(r.scenario_id, r.split) == r.split
    for s in CORPUS_SPLITS:
        part = [r for r in rows if r.split == s]
        assert part and set(r.label for r in part) == set(JUDGE_LABELS), s
    assert [r.id for r in load_judge_corpus("test")] == [r.id for r in rows if r.split == "test"]
    assert len(load_judge_corpus(["train", "dev"])) == sum(r.split != "test" for r in rows)
    s = summarise(rows)
    assert s["n"] == len(rows) and sum(s["scenarios"].values()) == len(split_of)
    assert len(corpus_hash(rows)) == 16 and corpus_hash(rows) != corpus_hash(rows[1:])


@pytest.mark.parametrize("change, message", [
    ({"label": "joy"}, "label 'joy'"),
    ({"split": "validation"}, "split 'validation'"),
    ({"form": "poem"}, "form 'poem'"),
    ({"valence": "bad"}, "valence 'bad'"),
    ({"source": "gpt"}, "source 'gpt'"),
    ({"scenario": ""}, "field 'scenario'"),
])
def test_loader_rejects_bad_rows(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        load_judge_corpus(path=_write(tmp_path, [_row(**change)]))


def test_loader_rejects_duplicates_shared_scenarios_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="duplicate id"):
        load_judge_corpus(path=_write(tmp_path, [_row(), _row()]))
    with pytest.raises(ValueError, match="scenario 'c1s00' is in split 'test'.*'train'"):
        load_judge_corpus(path=_write(tmp_path, [_row(), _row(id="x", split="test")]))
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(_row()) + "\n{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl: line 2: invalid JSON"):
        load_judge_corpus(path=p)
    p.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_judge_corpus(path=p)
    with pytest.raises(ValueError, match="no rows"):
        load_judge_corpus(path=_write(tmp_path, []))
    with pytest.raises(ValueError, match="unknown corpus split"):
        load_judge_corpus("holdout", path=_write(tmp_path, [_row()]))
    ok = load_judge_corpus(path=_write(tmp_path, [_row(), _row(id="m", source="model:smollm2-135m/steering", form="generated")]))
    assert [r.source for r in ok] == ["written", "model:smollm2-135m/steering"]
