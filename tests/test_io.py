"""Artifacts: atomic writes, safetensors + JSON round trips, corrupt files give clear errors."""
import json
import os

import pytest
import torch

from emokernels.io import (CorruptArtifactError, append_jsonl, load_tensors, read_json, read_jsonl, save_tensors,
                           write_json)


def test_tensors_round_trip_with_metadata(tmp_path):
    t = {"direction.3": torch.randn(5, 7), "sigma": torch.arange(4.0)}
    path = save_tensors(tmp_path / "dirs", t, {"model": "tiny-llama", "layers": [3]})
    got, meta = load_tensors(path)
    assert meta == {"model": "tiny-llama", "layers": [3]}
    assert all(torch.equal(got[k], t[k]) for k in t)
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"  # plain readable files, not mkstemp's 0600


def test_corrupt_safetensors_and_json_name_the_file(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(CorruptArtifactError, match="broken.safetensors"):
        load_tensors(bad)
    (tmp_path / "meta.json").write_text("{oops")
    with pytest.raises(CorruptArtifactError, match="meta.json"):
        read_json(tmp_path / "meta.json")
    with pytest.raises(FileNotFoundError, match="no artifact"):
        load_tensors(tmp_path / "missing")


def test_jsonl_drops_a_torn_last_line_but_not_a_bad_middle_line(tmp_path):
    p = tmp_path / "rows.jsonl"
    append_jsonl(p, [{"key": "a"}, {"key": "b"}])
    with open(p, "a") as f:
        f.write('{"key": "c", "te')  # a crash mid-append
    assert [r["key"] for r in read_jsonl(p)] == ["a", "b"]
    p.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(CorruptArtifactError, match=":2:"):
        read_jsonl(p)


def test_write_json_replaces_atomically(tmp_path):
    p = write_json(tmp_path / "state.json", {"done": ["generate"]})
    write_json(p, {"done": ["generate", "judge"]})
    assert json.loads(p.read_text())["done"] == ["generate", "judge"]
    assert [f.name for f in tmp_path.iterdir()] == ["state.json"]  # no temp files left behind
