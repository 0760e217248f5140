"""Imports follow the workflow downhill: a module imports only from its own layer or below.

Layers, bottom to top: data (with the low-level utilities ``io`` and ``dtypes``), models, ops,
patch, judge, discover, control, evaluate, then the top (``pipeline``, ``report``, ``assets``,
``cli/`` and the package ``__init__``). Every ``import`` / ``from ... import`` in every module
under ``emokernels/`` counts, at any depth (also the lazy ones inside functions).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "emokernels"

# first name under emokernels -> layer
LAYERS = {
    "data": 0, "io": 0, "dtypes": 0,
    "models": 1,
    "ops": 2,
    "patch": 3,
    "judge": 4,
    "discover": 5,
    "control": 6,
    "evaluate": 7,
    "pipeline": 8, "report": 8, "assets": 8, "cli": 8, "__init__": 8,
}

# (importing module, imported module) -> why the upward import stays
ALLOWED = {
    ("emokernels.discover.circuits", "emokernels.control.modulation"):
        "Circuit.to_interventions: patch() expands objects through their to_interventions protocol, so a "
        "circuit applies itself; the apply logic lives in control (lazy import, inside the method)",
    ("emokernels.control.steering", "emokernels.evaluate.naturalness"):
        "alpha_sweep's naturalness guard rejects an alpha whose replies degenerate with evaluate's "
        "degenerate(), a text-only check; moving it below control would split the naturalness module (lazy import)",
    ("emokernels.data.generate", "emokernels.models.loader"):
        "generate_rows runs a model and records the name it was loaded by (models.loader.model_name_of, "
        "only when the caller gives no model_name); generation is stage 0 of the workflow but needs a model (lazy import)",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    if key not in LAYERS:
        raise KeyError(f"{module}: no layer for emokernels.{key}; add it to LAYERS in {Path(__file__).name}")
    return LAYERS[key]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every emokernels import in ``path``; ``from X import name``
    counts as ``X.name`` so ``from .. import options`` names the module it loads."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "emokernels"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "emokernels":
                continue
            if target == "emokernels":  # from emokernels import X / from .. import X: X names the layer
                out += [(node.lineno, f"emokernels.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, target))
    return out


def _violations() -> list[tuple[str, int, str]]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _module_name(path)
        for line, target in _imports(path):
            if _layer(target) > _layer(src):
                bad.append((src, line, target))
    return bad


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        _layer(_module_name(path))


def test_imports_run_downhill():
    found = _violations()
    unexpected = [f"{src}:{line} imports {target}" for src, line, target in found
                  if not any(src == a and (target == b or target.startswith(b + ".")) for a, b in ALLOWED)]
    assert not unexpected, "imports from a higher layer:\n" + "\n".join(unexpected)


@pytest.mark.parametrize("pair", sorted(ALLOWED), ids=lambda p: f"{p[0]}->{p[1]}")
def test_allow_list_is_needed_and_explained(pair):
    """An exception that no longer happens must leave the list (and each one says why it stays)."""
    assert len(ALLOWED[pair]) > 20
    assert any((src, target) == pair for src, _, target in _violations()), f"{pair} no longer imports upward: remove it"


def test_only_the_command_line_imports_the_command_line():
    """The front ends sit on top: no stage module, and not the pipeline, imports ``emokernels.cli``."""
    bad = [f"{_module_name(p)}:{line} imports {target}" for p in sorted(PACKAGE.rglob("*.py"))
           if not _module_name(p).startswith("emokernels.cli")
           for line, target in _imports(p) if target == "emokernels.cli" or target.startswith("emokernels.cli.")]
    assert not bad, "\n".join(bad)
