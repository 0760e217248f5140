"""emokernels: find and control emotion circuits inside transformer language models.

Workflow: data -> generate -> judge -> capture -> directions -> components -> influence ->
circuits -> control -> evaluate. ``emokernels.patch`` applies any intervention inside the
forward pass (reference hooks or fused kernels).

Importing the package is light: it sets no environment variable and imports neither torch nor
transformers; ``patch`` and ``Intervention`` load ``emokernels.patch`` on first use.
"""
import sys as _sys
import types as _types

__version__ = "0.1.0"
__all__ = ["Intervention", "patch", "__version__"]

_LAZY = {"Intervention": "emokernels.patch", "patch": "emokernels.patch"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'emokernels' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(_types.ModuleType):
    """``emokernels.patch`` is the function, as with an eager ``from .patch import patch``: the
    import system binds the submodule ``emokernels.patch`` onto the package when it loads, and
    this puts the function back in its place (the submodule stays in ``sys.modules``)."""

    def __setattr__(self, name, value):
        if name == "patch" and isinstance(value, _types.ModuleType) and callable(getattr(value, "patch", None)):
            value = value.patch
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
