"""The README's quick start runs as written."""
from pathlib import Path

import torch


def test_readme_quick_start_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("```python\nimport torch, emokernels") + len("```python\n")
    code = text[start : text.index("```", start)]
    scope: dict = {}
    exec(compile(code.replace("print(", "_printed = ("), "README quick start", "exec"), scope)  # noqa: S102
    assert len(scope["_printed"]) == 2 and all(isinstance(t, str) for t in scope["_printed"])
    assert scope["proj"].shape == (30, 2, 6) and torch.isfinite(scope["proj"]).all()
