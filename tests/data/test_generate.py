import contextlib
import json

import pytest
import torch

from emokernels.cli import main as cli_main
from emokernels.data.generate import (
    DEFAULT_DECODING,
    decoding_settings,
    generate_rows,
    prompt_texts,
    truncate_torn_tail,
)
from emokernels.data.sev import iter_units, load_split
from emokernels.io import read_jsonl
from tests.helpers import smollm, tiny


def _units(n_skeletons=2, emotions=("anger", "fear"), valences=("positive", "negative")):
    return list(iter_units(load_split("train", n_skeletons), emotions, valences))


class CountingModel:
    """Wraps a model and counts generate() calls and the rows they produced."""

    def __init__(self, model):
        self.model, self.calls, self.rows = model, 0, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def parameters(self):
        return self.model.parameters()

    def generate(self, **kw):
        self.calls += 1
        self.rows += kw["input_ids"].shape[0]
        return self.model.generate(**kw)


def test_left_padded_batches_match_batch_size_one_tiny(tmp_path):
    model, tok = tiny("llama")
    units = _units(2)  # prompts of different lengths -> real left padding
    lens = {len(tok(t, add_special_tokens=False)["input_ids"]) for t in prompt_texts(tok, units)}
    assert len(lens) > 1
    a = generate_rows(model, tok, units, tmp_path / "a.jsonl", batch_size=8, max_new_tokens=10, progress=False)
    b = generate_rows(model, tok, units, tmp_path / "b.jsonl", batch_size=1, max_new_tokens=10, progress=False)
    assert [r["key"] for r in a] == [u[3] for u in units]
    assert [r["text"] for r in a] == [r["text"] for r in b]
    assert [r["n_new_tokens"] for r in a] == [r["n_new_tokens"] for r in b]
    assert all(r["text"] for r in a) and all(r["input_len"] > 20 for r in a)


def test_row_fields(tmp_path):
    model, tok = tiny("qwen2")
    units = _units(1, emotions=("anger",), valences=("neutral",))
    (row,) = generate_rows(model, tok, units, tmp_path / "g.jsonl", max_new_tokens=6, progress=False,
                           model_name="tiny-qwen2", extra={"split": "train"})
    sk = units[0][0]
    assert row["key"] == f"{sk.skeleton_id}__neutral__anger"
    assert (row["skeleton_id"], row["theme"], row["valence"], row["emotion"]) == (sk.skeleton_id, sk.theme, "neutral", "anger")
    assert row["condition"] == "prompt" and row["model"] == "tiny-qwen2" and row["split"] == "train"
    assert row["prompt"]["preset"] == "strong" and row["prompt"]["date"]
    assert row["decoding"] == {**DEFAULT_DECODING, "max_new_tokens": 6}
    assert 4 <= row["n_new_tokens"] <= 6  # min_new_tokens=4
    assert read_jsonl(tmp_path / "g.jsonl") == [row]


def test_neutral_mode_uses_neutral_prompt_and_patch_factory_per_batch(tmp_path):
    model, tok = tiny("llama")
    units = _units(1)
    texts = prompt_texts(tok, units, emotion_mode="neutral")
    assert all("anger" not in t and "fear" not in t for t in texts)
    seen = []

    @contextlib.contextmanager
    def factory(batch_units):
        seen.append([u[2] for u in batch_units])
        yield

    rows = generate_rows(model, tok, units, tmp_path / "s.jsonl", emotion_mode="neutral", condition="steering",
                         patch_factory=factory, batch_size=3, max_new_tokens=4, progress=False)
    assert seen == [["anger", "fear", "anger"], ["fear"]]
    assert {r["condition"] for r in rows} == {"steering"}


def test_resume_after_crash_does_not_regenerate(tmp_path):
    model, tok = tiny("llama")
    units = _units(2)  # 8 units
    out = tmp_path / "g.jsonl"

    class Boom(RuntimeError):
        pass

    n_batches = []

    @contextlib.contextmanager
    def crash_on_second_batch(batch_units):
        n_batches.append(1)
        if len(n_batches) == 2:
            raise Boom
        yield

    counting = CountingModel(model)
    with pytest.raises(Boom):
        generate_rows(counting, tok, units, out, batch_size=3, max_new_tokens=5, progress=False,
                      patch_factory=crash_on_second_batch, model_name="m")
    assert counting.rows == 3 and len(read_jsonl(out)) == 3
    # a crash mid-append leaves a torn last line: it must be dropped, not glued to the next row
    with open(out, "a") as f:
        f.write('{"key": "torn')
    counting2 = CountingModel(model)
    rows = generate_rows(counting2, tok, units, out, batch_size=3, max_new_tokens=5, progress=False, model_name="m")
    assert counting2.rows == 5  # only the 5 missing units were generated
    keys = [r["key"] for r in read_jsonl(out)]
    assert sorted(keys) == sorted(u[3] for u in units) and len(keys) == len(set(keys))
    # third run: nothing left to do
    counting3 = CountingModel(model)
    again = generate_rows(counting3, tok, units, out, batch_size=3, max_new_tokens=5, progress=False, model_name="m")
    assert counting3.calls == 0 and again == rows
    # the resumed rows equal a fresh uninterrupted run
    fresh = generate_rows(model, tok, units, tmp_path / "fresh.jsonl", batch_size=3, max_new_tokens=5, progress=False, model_name="m")
    assert [r["text"] for r in fresh] == [r["text"] for r in rows]


def test_resume_refuses_other_settings(tmp_path):
    model, tok = tiny("llama")
    units = _units(1, emotions=("anger",), valences=("neutral",))
    out = tmp_path / "g.jsonl"
    generate_rows(model, tok, units, out, max_new_tokens=4, progress=False, model_name="m")
    with pytest.raises(ValueError, match="other settings"):
        generate_rows(model, tok, units, out, max_new_tokens=5, progress=False, model_name="m")
    rows = generate_rows(model, tok, units, out, max_new_tokens=5, progress=False, model_name="m", resume=False)
    assert len(read_jsonl(out)) == 1 and rows[0]["decoding"]["max_new_tokens"] == 5


def test_truncate_torn_tail(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"b"')
    assert truncate_torn_tail(p) and p.read_text() == '{"a": 1}\n'
    assert not truncate_torn_tail(p)


def test_decoding_settings_validate():
    assert decoding_settings(None, 7)["max_new_tokens"] == 7
    with pytest.raises(ValueError, match="unknown decoding"):
        decoding_settings({"temperature": 0.7})
    with pytest.raises(ValueError, match="greedy"):
        decoding_settings({"do_sample": True})
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoding_settings(None, 0)


@pytest.mark.slow
def test_smollm_left_padding_matches_single_rows(tmp_path):
    model, tok = smollm(torch.float32)
    units = list(iter_units(load_split("test", 3)[1:3], ("anger",), ("negative",)))
    a = generate_rows(model, tok, units, tmp_path / "a.jsonl", batch_size=2, max_new_tokens=8, progress=False)
    b = generate_rows(model, tok, units, tmp_path / "b.jsonl", batch_size=1, max_new_tokens=8, progress=False)
    assert [r["text"] for r in a] == [r["text"] for r in b]
    assert all(len(r["text"].split()) >= 2 for r in a)


@pytest.mark.parametrize("argv, message", [
    (["--emotions", "anger,joy"], "joy"),
    (["--split", "dev"], "dev"),
    (["--limit", "0"], "--limit"),
    (["--batch-size", "0"], "--batch-size"),
    (["--preset", "nonsense"], "preset"),
])
def test_cli_bad_arguments(tmp_path, capsys, argv, message):
    rc = cli_main(["generate", "--model", "tiny-llama", "--out", str(tmp_path / "g.jsonl"), *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err
    assert not (tmp_path / "g.jsonl").exists()


def test_cli_generates_and_resumes(tmp_path, capsys):
    out = tmp_path / "g.jsonl"
    argv = ["generate", "--model", "tiny-llama", "--dtype", "fp32", "--split", "test", "--limit", "1",
            "--emotions", "anger,fear", "--valences", "positive", "--out", str(out), "--max-new-tokens", "4", "--no-progress"]
    assert cli_main(argv) == 0
    rows = read_jsonl(out)
    assert [r["emotion"] for r in rows] == ["anger", "fear"] and rows[0]["split"] == "test"
    assert cli_main(argv) == 0 and read_jsonl(out) == rows
    assert "2 rows" in capsys.readouterr().out
    json.dumps(rows)
