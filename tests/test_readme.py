"""The README's quick start and its circuit snippet run as written."""
from pathlib import Path

import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _snippet(first_line: str) -> str:
    start = README.index("```python\n" + first_line) + len("```python\n")
    return README[start : README.index("```", start)]


def test_readme_quick_start_runs(tmp_path):
    scope: dict = {}
    code = _snippet("import torch, emokernels").replace("print(", "_printed = (")
    exec(compile(code, "README quick start", "exec"), scope)  # noqa: S102
    assert len(scope["_printed"]) == 2 and all(isinstance(t, str) for t in scope["_printed"])
    assert scope["proj"].shape == (30, 2, 6) and torch.isfinite(scope["proj"]).all()

    # the circuit snippet, in the quick start's scope, on a circuit of random components
    from tests.control.test_modulation import _circuit

    path = tmp_path / "circuit"
    _circuit(scope["model"], K_total=120).save(path)
    code = _snippet("from emokernels.discover.circuits import Circuit")
    assert '"runs/smollm2-135m/circuit/circuit"' in code
    exec(compile(code.replace('"runs/smollm2-135m/circuit/circuit"', repr(str(path))), "README circuit", "exec"), scope)  # noqa: S102
    prompt_len = scope["batch"]["input_ids"].shape[1]
    assert scope["out"].shape[0] == 2 and scope["out"].shape[1] > prompt_len
