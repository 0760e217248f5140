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


# -- issue 15: unreadable files, non-UTF-8 bytes, stale sidecars, one writer per output ---------
import subprocess
import sys
import textwrap

from emokernels.io import (DuplicateKeyError, OutputLockedError, check_unique_keys, dedupe_jsonl, exclusive_output,
                           lock_path, require_finite)


def _truncated_safetensors(tmp_path):
    good = save_tensors(tmp_path / "t", {"x": torch.randn(64)}, {"kind": "k"})
    good.write_bytes(good.read_bytes()[:-40])
    return good


def _bad_header_length(tmp_path):
    p = tmp_path / "h.safetensors"
    p.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    return p


def _truncated_sidecar(tmp_path):
    p = save_tensors(tmp_path / "s", {"x": torch.ones(2)}, {"kind": "k", "long": "x" * 50})
    j = p.with_suffix(".json")
    j.write_text(j.read_text()[:20])
    return p


def _non_utf8_sidecar(tmp_path):
    p = save_tensors(tmp_path / "u", {"x": torch.ones(2)}, {"kind": "k"})
    p.with_suffix(".json").write_bytes(b'{"kind": "\xff"}')
    return p


LOAD_FAULTS = [  # (case, make file, substrings the message must contain)
    ("truncated safetensors", _truncated_safetensors, ["t.safetensors", "truncated or corrupt"]),
    ("header length past the end", _bad_header_length, ["h.safetensors", "not a readable safetensors"]),
    ("truncated JSON sidecar", _truncated_sidecar, ["s.json", "not valid JSON"]),
    ("non-UTF-8 JSON sidecar", _non_utf8_sidecar, ["u.json", "line 1", "not UTF-8"]),
]


@pytest.mark.parametrize("case,make,needles", LOAD_FAULTS, ids=[c[0] for c in LOAD_FAULTS])
def test_unreadable_artifacts_name_the_file(tmp_path, case, make, needles):
    with pytest.raises(CorruptArtifactError) as err:
        load_tensors(make(tmp_path))
    for n in needles:
        assert n in str(err.value), (case, str(err.value))


JSONL_FAULTS = [  # (case, bytes, expected error type, substrings)
    ("non-UTF-8 byte on line 2", b'{"key": "a"}\n{"key": "\xe9t\xe9"}\n', CorruptArtifactError, ["rows.jsonl", "line 2", "0xe9", "not UTF-8"]),
    ("bad JSON on line 3", b'{"key": "a"}\n{"key": "b"}\n{oops\n{"key": "c"}\n', CorruptArtifactError, ["rows.jsonl:3", "not valid JSON"]),
    ("a line that is not an object", b'{"key": "a"}\n[1, 2]\n', CorruptArtifactError, ["rows.jsonl:2", "expected a JSON object"]),
]


@pytest.mark.parametrize("case,data,etype,needles", JSONL_FAULTS, ids=[c[0] for c in JSONL_FAULTS])
def test_jsonl_reader_names_file_and_line(tmp_path, case, data, etype, needles):
    p = tmp_path / "rows.jsonl"
    p.write_bytes(data)
    with pytest.raises(etype) as err:
        read_jsonl(p)
    for n in needles:
        assert n in str(err.value), (case, str(err.value))


def test_data_file_readers_name_file_and_line_of_non_utf8_bytes(tmp_path):
    from emokernels.data.corpus import load_judge_corpus
    from emokernels.data.sev import SEVFormatError, load_split

    p = tmp_path / "data.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": 2}\n{"text": "caf\xe9"}\n')
    cases = [(load_split, SEVFormatError), (lambda x: load_judge_corpus(path=x), ValueError)]
    for reader, etype in cases:
        with pytest.raises(etype) as err:
            reader(p)
        assert "data.jsonl: line 3" in str(err.value) and "not UTF-8" in str(err.value)


def test_require_finite_names_file_and_key():
    require_finite({"a": torch.ones(3), "ids": torch.arange(3)}, "f.safetensors")
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(CorruptArtifactError, match=r"f\.safetensors: tensor 'b' holds 1 non-finite"):
            require_finite({"a": torch.ones(3), "b": torch.tensor([0.0, bad])}, "f.safetensors")


def test_a_kill_between_tensors_and_sidecar_never_pairs_new_tensors_with_old_metadata(tmp_path, monkeypatch):
    import emokernels.io as io_mod

    path = save_tensors(tmp_path / "a", {"x": torch.zeros(3)}, {"n_done": 1})
    real = io_mod.write_json

    def killed(*a, **k):
        raise KeyboardInterrupt("killed between the two files")

    monkeypatch.setattr(io_mod, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        save_tensors(path, {"x": torch.ones(3)}, {"n_done": 2})
    monkeypatch.setattr(io_mod, "write_json", real)
    assert json.loads(path.with_suffix(".json").read_text())["n_done"] == 1  # the sidecar is the old one
    t, meta = load_tensors(path)
    assert torch.equal(t["x"], torch.ones(3)) and meta == {"n_done": 2}  # metadata of these tensors
    # a sidecar edited by hand (same write) is still the one read
    save_tensors(path, {"x": torch.ones(3)}, {"n_done": 2})
    m = json.loads(path.with_suffix(".json").read_text())
    m["note"] = "edited"
    path.with_suffix(".json").write_text(json.dumps(m))
    assert load_tensors(path)[1] == {"n_done": 2, "note": "edited"}
    # a checkpoint is one file
    ck = save_tensors(tmp_path / "ck", {"x": torch.ones(1)}, {"n_done": 3}, sidecar=False)
    assert not ck.with_suffix(".json").exists() and load_tensors(ck)[1] == {"n_done": 3}


_HOLDER = textwrap.dedent("""
    import sys
    from emokernels.io import exclusive_output
    with exclusive_output(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()
""")


def _hold_lock(path):
    """Another process that holds the output lock on ``path`` until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_gets_a_clear_error_naming_file_and_pid(tmp_path):
    out = tmp_path / "gen.jsonl"
    proc = _hold_lock(out)
    try:
        with pytest.raises(OutputLockedError) as err:
            with exclusive_output(out):
                pass
        msg = str(err.value)
        assert str(out) in msg and f"PID {proc.pid}" in msg and "another --out" in msg
        assert isinstance(err.value, ValueError)  # the CLI's one-line error path catches it
    finally:
        proc.kill()  # kill -9: the kernel drops the flock with the process
        proc.wait()
    assert lock_path(out).exists()  # a stale sidecar from the killed holder ...
    with exclusive_output(out):  # ... does not block the rerun
        with exclusive_output(out):  # re-entrant in one process
            pass
    assert not lock_path(out).exists()


def test_duplicate_keys_name_the_keys_and_the_repair(tmp_path):
    p = tmp_path / "gen.jsonl"
    append_jsonl(p, [{"key": k} for k in ("a", "b", "a", "c", "b", "a")])
    with pytest.raises(DuplicateKeyError) as err:
        read_jsonl(p, unique_key="key")
    msg = str(err.value)
    for needle in (str(p), "2 duplicated key(s)", "'a', 'b'", "dedupe_jsonl", "delete"):
        assert needle in msg, msg
    with pytest.raises(DuplicateKeyError, match="the rows hold 1 duplicated key"):
        check_unique_keys([{"key": "x"}, {"key": "x"}])
    assert dedupe_jsonl(p) == 3
    assert [r["key"] for r in read_jsonl(p, unique_key="key")] == ["a", "b", "c"]
