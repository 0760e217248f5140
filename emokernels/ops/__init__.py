"""emokernels.ops: fused intervention kernels (one op per file, reference beside each kernel).

Exports :func:`gather_add`, :func:`capture_project`, :func:`neuron_edit`, :func:`head_edit` and
:func:`resolve_backend`. ``neuron_edit`` / ``head_edit`` are imported lazily on first access.
"""
from __future__ import annotations

from .backends import resolve_backend
from .capture_project import capture_project, capture_project_reference
from .gather_add import gather_add, gather_add_reference

__all__ = [
    "gather_add",
    "gather_add_reference",
    "capture_project",
    "capture_project_reference",
    "neuron_edit",
    "head_edit",
    "resolve_backend",
]

_LAZY = {"neuron_edit": ".neuron_edit", "neuron_edit_reference": ".neuron_edit",
         "head_edit": ".head_edit", "head_edit_reference": ".head_edit"}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
