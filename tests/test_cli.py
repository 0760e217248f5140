"""The command line: a light parser, one shared option set, one-line errors before the model loads,
the last line naming what was written, and the llama.cpp control-vector export."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emokernels.cli import main

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY",)}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


# -- light imports, no global settings -------------------------------------------------------------
def test_help_builds_without_torch():
    """`emokernels --help` and every `emokernels CMD --help` build their parser without torch or transformers."""
    code = """
import contextlib, io, sys
from emokernels.cli import build_parser
p = build_parser()
for argv in (["--help"], *([c, "--help"] for c in p._subparsers._group_actions[0].choices)):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            p.parse_args(argv)
        except SystemExit as e:
            assert e.code == 0, argv
    assert "(default" in out.getvalue() or argv == ["--help"], argv
heavy = [m for m in ("torch", "transformers", "numpy") if m in sys.modules]
assert not heavy, heavy
print("ok")
"""
    r = _python(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_import_sets_no_environment_variable():
    """`import emokernels` (and its loaders) leave os.environ as they found it, and import no torch."""
    code = """
import os, sys
before = dict(os.environ)
import emokernels
assert "torch" not in sys.modules and "transformers" not in sys.modules, "import emokernels is not light"
assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
import torch, transformers
before = dict(os.environ)
import emokernels.models.loader, emokernels.judge.features, emokernels.models.tiny
from emokernels import patch, Intervention
assert callable(patch) and callable(emokernels.patch) and Intervention.__name__ == "Intervention"
assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
print("ok")
"""
    r = _python(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_cli_constants_agree_with_the_heavy_modules():
    """Choices kept in the light CLI modules (so --help needs no torch) equal their sources."""
    from emokernels import pipeline
    from emokernels.cli import generate as generate_cli
    from emokernels.cli import run as run_cli
    from emokernels.cli.judge import TRAINABLE_NAMES
    from emokernels.data import generate
    from emokernels.judge import probe

    assert run_cli.STAGES == pipeline.STAGES
    assert generate_cli.DEFAULT_MAX_NEW_TOKENS == generate.DEFAULT_DECODING["max_new_tokens"]
    assert generate_cli.PAPER_MAX_NEW_TOKENS == generate.PAPER_STAGE01_DECODING["max_new_tokens"]
    assert generate_cli.EMOTION_MODES == generate.EMOTION_MODES
    assert TRAINABLE_NAMES == (*probe.TRAINABLE, "llm-yesno")


# -- bad arguments: one line, exit 2, before the model loads ------------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    """Any bad-argument case must fail before a model is loaded."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("emokernels.models.loader.load", refuse)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty_model").mkdir()
    gens = tmp_path / "gens.jsonl"
    gens.write_text(json.dumps({"key": "k", "text": "t", "emotion": "anger"}) + "\n")
    _directions(tmp_path)  # a valid artifact in {t}/dirs
    return tmp_path


GEN = ["generate", "--model", "tiny-llama", "--out", "{t}/g.jsonl"]
STEER = ["steer", "--model", "tiny-llama", "--directions", "{t}/nowhere", "--out", "{t}/s.jsonl"]
RUN = ["run", "--model", "tiny-llama", "--out", "{t}/run"]
EXPORT = ["export-gguf", "--directions", "{t}/nowhere", "--emotion", "anger", "--out", "{t}/a.gguf"]

# (case id, argv, substring the one-line error must contain)
BAD_ARGS = [
    ("emotions-empty", GEN + ["--emotions", ""], "--emotions: is empty"),
    ("emotions-unknown", GEN + ["--emotions", "anger,joy"], "'joy'; valid emotions: anger, sadness, happiness, fear, surprise, disgust"),
    ("emotions-duplicate", GEN + ["--emotions", "anger,anger"], "duplicate emotion"),
    ("valences-empty", GEN + ["--valences", ","], "--valences: is empty"),
    ("limit-over-split", GEN + ["--limit", "500"], "--limit 500 exceeds the 160 skeletons of the train split"),
    ("limit-zero", GEN + ["--limit", "0"], "--limit: must be >= 1"),
    ("limit-text", GEN + ["--limit", "ten"], "expected a whole number"),
    ("dtype-unknown", GEN + ["--dtype", "float33"], "unknown dtype 'float33'"),
    ("split-unknown", GEN + ["--split", "dev"], "SEV file not found: 'dev'"),
    ("preset-unknown", GEN + ["--preset", "nonsense"], "preset"),
    ("out-is-dir", ["generate", "--model", "tiny-llama", "--out", "{t}/a_dir"], "--out {t}/a_dir is a folder"),
    ("out-under-file", ["generate", "--model", "tiny-llama", "--out", "{t}/a_file/g.jsonl"], "{t}/a_file is a file, not a folder"),
    ("model-unknown", ["generate", "--model", "no-such-model", "--out", "{t}/g.jsonl"], "unknown model 'no-such-model'"),
    ("model-tiny-unknown", ["generate", "--model", "tiny-gpt9", "--out", "{t}/g.jsonl"], "unknown tiny model 'tiny-gpt9'"),
    ("model-folder-empty", ["generate", "--model", "{t}/empty_model", "--out", "{t}/g.jsonl"],
     "model folder {t}/empty_model is empty: missing config.json; tokenizer files"),
    ("model-folder-missing", ["generate", "--model", "{t}/no_model", "--out", "{t}/g.jsonl"], "model path {t}/no_model does not exist"),
    ("model-file-not-gguf", ["generate", "--model", "{t}/a_file", "--out", "{t}/g.jsonl"], "is a file but not a .gguf"),
    ("unknown-flag", GEN + ["--bogus"], "unrecognized arguments: --bogus"),
    ("steer-layers-backwards", STEER + ["--layers", "9-3"], "range '9-3' runs backwards: write the lower layer first ('3-9')"),
    ("steer-layers-garbage", STEER + ["--layers", "a-b"], "expected layers as 'a-b' or 'a,b,c'"),
    ("steer-alpha-nan", STEER + ["--alpha", "nan"], "--alpha must be a finite number"),
    ("steer-alpha-word", STEER + ["--alpha", "lots"], "--alpha must be a finite number, 'default', 'paper' or 'auto'"),
    ("steer-sweep-inf", STEER + ["--alpha", "auto", "--sweep-alphas", "1,inf"], "--sweep-alphas must be one or more finite"),
    ("steer-layers-outside", [a.replace("nowhere", "dirs") for a in STEER] + ["--layers", "4-9"], "steering layers [6, 7, 8, 9] invalid for a 6-layer model"),
    ("steer-no-directions", STEER, "--directions {t}/nowhere: missing {t}/nowhere/directions.safetensors"),
    ("steer-limit-over-split", [a.replace("nowhere", "dirs") for a in STEER] + ["--limit", "161"], "exceeds the 160 skeletons of the test split"),
    ("judge-in-and-reference", ["judge", "--in", "{t}/gens.jsonl", "--reference"], "argument --reference: not allowed with argument --in"),
    ("judge-in-and-evaluate", ["judge", "--in", "{t}/gens.jsonl", "--evaluate"], "not allowed with argument --in"),
    ("judge-in-without-out", ["judge", "--in", "{t}/gens.jsonl"], "--in and --out are required"),
    ("judge-out-is-in", ["judge", "--in", "{t}/gens.jsonl", "--out", "{t}/gens.jsonl"], "is the --in file"),
    ("judge-out-is-dir", ["judge", "--in", "{t}/gens.jsonl", "--out", "{t}/a_dir"], "is a folder"),
    ("judge-missing-in", ["judge", "--in", "{t}/nope.jsonl", "--out", "{t}/o.jsonl"], "no generations file at {t}/nope.jsonl"),
    ("judge-same-second", ["judge", "--in", "{t}/gens.jsonl", "--out", "{t}/o.jsonl", "--judge", "minilm",
                           "--second-judge", "minilm"], "--second-judge must differ from --judge"),
    ("judge-unknown", ["judge", "--in", "{t}/gens.jsonl", "--out", "{t}/o.jsonl", "--judge", "gpt"], "invalid choice: 'gpt'"),
    ("directions-out-is-file", ["directions", "--model", "tiny-llama", "--out", "{t}/a_file"], "--out {t}/a_file is a file; give a folder"),
    ("directions-test-split", ["directions", "--model", "tiny-llama", "--split", "test", "--out", "{t}/d"], "train split only"),
    ("directions-missing-texts", ["directions", "--model", "tiny-llama", "--source", "text", "--texts", "{t}/nope.jsonl",
                                  "--out", "{t}/d"], "--texts {t}/nope.jsonl: no such file"),
    ("directions-probe-limit", ["directions", "--model", "tiny-llama", "--probe-limit", "999", "--out", "{t}/d"],
     "--probe-limit 999 exceeds the 160 skeletons of the test split"),
    ("components-val-layers", ["components", "--model", "tiny-llama", "--directions", "{t}/nowhere", "--val-layers", "5-1",
                               "--out", "{t}/c"], "runs backwards"),
    ("components-no-directions", ["components", "--model", "tiny-llama", "--directions", "{t}/nowhere", "--out", "{t}/c"],
     "--directions {t}/nowhere: missing"),
    ("run-test-limit", RUN + ["--test-limit", "500"], "--test-limit 500 exceeds the 160 skeletons of the test split"),
    ("run-train-limit-zero", RUN + ["--train-limit", "0"], "--train-limit: must be >= 1"),
    ("run-same-judges", RUN + ["--judge", "minilm", "--second-judge", "minilm"], "--second-judge must differ"),
    ("run-out-under-file", ["run", "--model", "tiny-llama", "--out", "{t}/a_file/run"], "is a file, not a folder"),
    ("run-max-degenerate-nan", RUN + ["--max-degenerate", "nan"], "must be a finite number"),
    ("run-dtype", RUN + ["--dtype", "int8"], "unknown dtype 'int8'"),
    ("export-no-directions", EXPORT, "--directions {t}/nowhere: missing"),
    ("export-emotion", EXPORT[:3] + ["--emotion", "joy", "--out", "{t}/a.gguf"], "invalid choice: 'joy'"),
    ("export-strength-inf", EXPORT + ["--strength", "inf"], "must be a finite, non-zero number"),
    ("no-command", [], ""),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in BAD_ARGS], ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments_fail_in_one_line(files, capsys, no_model_load, argv, message):
    argv = [a.replace("{t}", str(files)) for a in argv]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2
    if not argv:  # no command: the help, on stdout
        assert "COMMAND" in out
        return
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("emokernels"), err
    assert "error: " in lines[0] and message.replace("{t}", str(files)) in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (files / "g.jsonl").exists() and not (files / "s.jsonl").exists() and not (files / "a.gguf").exists()


def test_debug_shows_the_traceback(files, monkeypatch):
    argv = ["generate", "--model", "no-such-model", "--out", str(files / "g.jsonl")]
    with pytest.raises(ValueError, match="unknown model"):
        main(["--debug", *argv])
    with pytest.raises(ValueError, match="unknown model"):
        main([*argv, "--debug"])
    monkeypatch.setenv("EMOKERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown model"):
        main(argv)


def test_a_bug_is_not_hidden(files, monkeypatch):
    """Errors that are not bad input (here a RuntimeError from deep inside) keep their traceback."""
    def boom(*a, **k):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr("emokernels.models.loader.load", boom)
    with pytest.raises(RuntimeError, match="internal bug"):
        main(["generate", "--model", "tiny-llama", "--limit", "1", "--out", str(files / "g.jsonl")])


# -- commands that run: short max-new-tokens, the last line, disk full ---------------------------------
def test_generate_short_replies_and_last_line(tmp_path, capsys):
    """--max-new-tokens 2 works (the default 4-token floor follows it down) and the last line names the file."""
    out = tmp_path / "g.jsonl"
    argv = ["generate", "--model", "tiny-llama", "--dtype", "float32", "--split", "test", "--limit", "1", "--emotions",
            "anger", "--valences", "positive", "--max-new-tokens", "2", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"wrote {out} (1 rows)"
    row = json.loads(out.read_text())
    assert row["decoding"]["max_new_tokens"] == 2 and row["decoding"]["min_new_tokens"] == 2 and row["dtype"] == "fp32"


def test_disk_full_is_one_line(tmp_path, capsys, monkeypatch):
    def full(path, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("emokernels.data.generate.append_jsonl", full)
    argv = ["generate", "--model", "tiny-llama", "--dtype", "fp32", "--limit", "1", "--emotions", "anger", "--valences",
            "positive", "--max-new-tokens", "2", "--no-progress", "--out", str(tmp_path / "g.jsonl")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk full (no space left on device)" in err[0]


# -- GGUF control vector ------------------------------------------------------------------------------
def _directions(tmp_path, num_layers=6, d=64):
    from emokernels.discover.directions import EmotionDirections, unit_directions

    g = torch.Generator().manual_seed(0)
    v, n = unit_directions(torch.randn(2, num_layers, 6, d, generator=g))
    dirs = EmotionDirections(directions=v, sigma=torch.rand(2, num_layers, generator=g) + 0.5, norms=n,
                             model="tiny-llama", extra={"model_type": "llama"})
    dirs.save(tmp_path / "dirs")
    return dirs


@pytest.mark.parametrize("extra, alpha, layers", [
    ([], "default", [2, 3, 4]),  # default_layers(6) = round(0.39*6)..round(0.71*6)
    (["--strength", "1.5", "--layers", "1-2"], 1.5, [1, 2]),
    (["--strength", "paper", "--layers", "1,5"], 8.0, [1, 5]),
    (["--raw", "--layers", "3"], None, [3]),
])
def test_export_gguf_control_vector(tmp_path, capsys, extra, alpha, layers):
    """direction.k = α·σ_k·v_k (the strength llama.cpp --control-vector applies as is), read back with gguf."""
    from emokernels.control.steering import default_alpha
    from emokernels.discover.directions import read_gguf_control_vector

    dirs = _directions(tmp_path)
    out = tmp_path / "anger.gguf"
    assert main(["export-gguf", "--directions", str(tmp_path / "dirs"), "--emotion", "anger", "--out", str(out), *extra]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"wrote {out} (anger, blocks {layers[0]}-{layers[-1]}") and "--control-vector" in last
    vecs, fields = read_gguf_control_vector(out)
    assert fields["general.architecture"] == "controlvector" and fields["controlvector.layer_count"] == len(layers)
    assert fields["controlvector.model_hint"] == "tiny-llama"
    assert sorted(vecs) == layers
    a = default_alpha(64) if alpha == "default" else alpha
    for k in layers:
        v = dirs.vector("anger", k)
        want = v if alpha is None else a * float(dirs.sigma[1, k]) * v.double()
        torch.testing.assert_close(vecs[k].double(), want.double(), rtol=1e-6, atol=1e-7)


def test_export_gguf_rejects_block_zero(tmp_path, capsys):
    _directions(tmp_path)
    rc = main(["export-gguf", "--directions", str(tmp_path / "dirs"), "--emotion", "fear", "--layers", "0-2",
               "--out", str(tmp_path / "f.gguf")])
    assert rc == 2 and "block 0" in capsys.readouterr().err and not (tmp_path / "f.gguf").exists()
