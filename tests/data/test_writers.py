"""Issue 15: one writer per output (generate, judge, run) and duplicated keys that say how to repair."""
import pytest

from emokernels.data.sev import iter_units, load_split
from emokernels.io import DuplicateKeyError, OutputLockedError, append_jsonl, lock_path
from tests.test_io import _hold_lock


class _NeverCalled:
    """A judge / model stand-in: the lock must refuse the call before either is used."""

    name = "never"

    def __getattr__(self, item):
        raise AssertionError(f"{item} used although the output is locked")


def _generate(out):
    from emokernels.data.generate import generate_rows

    units = list(iter_units(load_split("train", 1), ["anger"], ["neutral"]))
    return generate_rows(_NeverCalled(), _NeverCalled(), units, out, model_name="m", progress=False)


def _judge(out):
    from emokernels.judge.rows import judge_rows

    return judge_rows([{"key": "a", "text": "x", "emotion": "anger"}], _NeverCalled(), out, progress=False)


def _run(out):
    from emokernels.cli import main

    return main(["run", "--model", "tiny-llama", "--out", str(out.parent), "--train-limit", "1"])


def _components(out):
    from emokernels.discover.components import discover_components
    from emokernels.discover.collect import sev_units
    from tests.helpers import random_directions, tiny

    model, tok = tiny("llama")
    v = random_directions(model)
    return discover_components(model, tok, sev_units(load_split("train", 1)), v, v, progress=False,
                               checkpoint=out.with_suffix(""))


def _capture(out):
    from emokernels.discover.capture import capture, prompt_units
    from tests.helpers import tiny

    model, tok = tiny("llama")
    return capture(model, tok, prompt_units(load_split("train", 1)), progress=False, checkpoint=out.with_suffix(""))


WRITERS = [("generate", _generate, "gen.jsonl"), ("judge", _judge, "judged.jsonl"), ("run", _run, "state.json"),
           ("components checkpoint", _components, "ck.safetensors"), ("directions capture checkpoint", _capture,
                                                                        "capture_checkpoint.safetensors")]


@pytest.mark.parametrize("name,write,file", WRITERS, ids=[w[0] for w in WRITERS])
def test_second_writer_of_an_output_is_refused(tmp_path, capsys, name, write, file):
    out = tmp_path / file
    append_jsonl(out, []) if file.endswith("jsonl") else None
    proc = _hold_lock(out)
    try:
        if name == "run":  # the CLI prints the error in one line and exits 2
            assert write(out) == 2
            msg = capsys.readouterr().err
        else:
            with pytest.raises(OutputLockedError) as err:
                write(out)
            msg = str(err.value)
        assert str(out if name != "run" else tmp_path) in msg and f"PID {proc.pid}" in msg, msg
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists() or out.read_text() == ""  # the refused writer wrote nothing
    assert lock_path(out).exists()  # the killed holder's sidecar; the next writer takes it over


READERS = [  # (case, file with duplicates, call)
    ("generate resumes", "gen.jsonl", lambda p: _generate(p)),
    ("judge resumes", "judged.jsonl", lambda p: _judge(p)),
    ("judge CLI reads generations", "gen.jsonl", lambda p: _judge_cli(p)),
]


def _judge_cli(gen):
    """The CLI prints the error as one line and exits 2: raise it again for the table's check."""
    import contextlib
    import io

    from emokernels.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["judge", "--in", str(gen), "--out", str(gen.with_name("o.jsonl"))])
    assert rc == 2 and len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
    raise DuplicateKeyError(err.getvalue())


@pytest.mark.parametrize("case,file,call", READERS, ids=[r[0] for r in READERS])
def test_duplicated_keys_name_the_keys_and_the_repair(tmp_path, case, file, call):
    p = tmp_path / file
    append_jsonl(p, [{"key": "s1__neutral__anger", "text": "a", "emotion": "anger"},
                     {"key": "k2", "text": "b", "emotion": "fear"}] * 2)
    with pytest.raises(DuplicateKeyError) as err:
        call(p)
    msg = str(err.value)
    for needle in (str(p), "2 duplicated key(s)", "'s1__neutral__anger', 'k2'", "dedupe_jsonl", f"delete {p}"):
        assert needle in msg, (case, msg)
