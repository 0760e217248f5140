"""Every ```python block of the README runs verbatim, in order, in one scope (as a reader pastes them)."""
import builtins
import re
from pathlib import Path

import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_has_the_snippets_this_test_checks():
    assert len(BLOCKS) == 2, "a README python block was added or removed: check what this test asserts about it"
    assert "Steering(dirs" in BLOCKS[0] and "Circuit.load(ready_path" in BLOCKS[0] and "torch.compile" in BLOCKS[1]


def test_readme_snippets_run_verbatim(monkeypatch):
    printed = []
    monkeypatch.setattr(builtins, "print", lambda *a, **k: printed.append(a[0] if len(a) == 1 else a))
    scope: dict = {}
    exec(compile(BLOCKS[0], "README quick start", "exec"), scope)  # noqa: S102

    model, gen, new = scope["model"], scope["gen"], scope["new"]
    steered, modulated = printed
    assert all(len(x) == 2 and all(isinstance(t, str) and t for t in x) for x in (steered, modulated))
    assert scope["proj"].shape == (30, 2, 6) and torch.isfinite(scope["proj"]).all()

    # each patch changed the replies, and left the model exactly as it was
    plain = new(model.generate(**gen))
    assert steered != plain and modulated != plain and steered != modulated
    assert new(model.generate(**gen)) == plain

    # the compile snippet, in the quick start's scope: compiled decode steps under the circuit
    exec(compile(BLOCKS[1], "README torch.compile", "exec"), scope)  # noqa: S102
    assert scope["logits"].shape == (2, 1, model.config.vocab_size) and torch.isfinite(scope["logits"]).all()
