"""Backend selection for the emokernels ops.

Backends (every op implements all four; they must agree with the op's ``*_reference``):

==============  ==================================================================================
``reference``   pure torch (fp32 accumulation); any device, every dtype, including fp64
``cpu``         the OpenMP C++ module ``emokernels_cpu`` (built at first use by ``_build.py``)
``triton``      Triton kernels; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` (tests)
``cuda``        the CUDA module ``emokernels_cuda`` (built with nvcc at first use)
==============  ==================================================================================

:func:`resolve_backend` maps ``(device, requested)`` to one of them. ``requested=None`` reads
``$EMOKERNELS_BACKEND`` (default ``"auto"``). ``auto``: CUDA tensors -> ``cuda`` if the CUDA module
loads, else ``triton``; CPU tensors -> ``cpu`` if the C++ module loads, else ``reference``. An
unavailable backend falls back to ``reference`` with a one-time :class:`RuntimeWarning` that names
the backend and the reason; results are never silently wrong. Explicitly asking (argument, not the
environment variable) for a backend that cannot take the tensor's device (``cpu`` for CUDA tensors,
``cuda`` for CPU tensors) is a :class:`ValueError`.

The result is cached per (device type, request), so a call costs one ``os.environ`` lookup
(when ``requested`` is None) and a dict lookup.
"""
from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Callable

import torch

__all__ = [
    "BACKENDS", "DTYPE_CODE", "FLOATS", "resolve_backend", "cpu_ext", "cuda_ext", "cpu_ext_error",
    "cuda_ext_error", "triton_available", "trace_reference", "triton_interpreting", "native_fn",
    "warn_once", "cuda_stream_ptr", "stream_args", "opt_ptr", "contiguous", "f32_contiguous",
    "acc_dtype", "check_devices",
]

BACKENDS = ("reference", "cpu", "triton", "cuda")

#: torch dtype -> dtype code of csrc/include/emk_common.h
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

#: the floating dtypes every op accepts (fp64 runs the reference)
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def acc_dtype(*tensors) -> torch.dtype:
    """The references' arithmetic dtype: fp64 if any given tensor (None skipped) is fp64, else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32

_UNSET = object()
_cpu: object = _UNSET
_cpu_err: str | None = None
_cuda: object = _UNSET
_cuda_err: str | None = None
_triton_ok: bool | None = None
_triton_err: str | None = None
_warned: set = set()
_cache: dict = {}


def warn_once(key, message: str) -> None:
    """``warnings.warn(message, RuntimeWarning)`` the first time ``key`` is seen in this process."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def cpu_ext() -> ModuleType | None:
    """The ``emokernels_cpu`` module (built on first call), or None if it cannot be built."""
    global _cpu, _cpu_err
    if _cpu is _UNSET:
        try:
            from . import _build

            _cpu = _build.build_cpu()
        except Exception as exc:  # BuildError, missing pybind11/compiler, import failure
            _cpu, _cpu_err = None, f"{type(exc).__name__}: {exc}"
    return _cpu  # type: ignore[return-value]


def cpu_ext_error() -> str | None:
    """Why :func:`cpu_ext` returned None (None if it loaded or was not tried)."""
    return _cpu_err


def cuda_ext() -> ModuleType | None:
    """The ``emokernels_cuda`` module (built with nvcc on first call), or None.

    Only attempted when ``torch.cuda.is_available()``.
    """
    global _cuda, _cuda_err
    if _cuda is _UNSET:
        if not torch.cuda.is_available():
            _cuda, _cuda_err = None, "torch.cuda.is_available() is False"
        else:
            try:
                from . import _build

                _cuda = _build.build_cuda()
            except Exception as exc:
                _cuda, _cuda_err = None, f"{type(exc).__name__}: {exc}"
    return _cuda  # type: ignore[return-value]


def cuda_ext_error() -> str | None:
    """Why :func:`cuda_ext` returned None (None if it loaded or was not tried)."""
    return _cuda_err


def triton_available() -> bool:
    global _triton_ok, _triton_err
    if _triton_ok is None:
        try:
            import triton  # noqa: F401

            _triton_ok = True
        except Exception as exc:
            _triton_ok, _triton_err = False, f"{type(exc).__name__}: {exc}"
    return _triton_ok


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_stream_ptr(t: torch.Tensor) -> int:
    """The current CUDA stream of ``t``'s device as an integer (for the CUDA launchers)."""
    return torch.cuda.current_stream(t.device).cuda_stream


def stream_args(backend: str, t: torch.Tensor) -> tuple:
    """The trailing launcher arguments of a native backend: the CUDA stream of ``t`` for ``cuda``, none for ``cpu``."""
    return (cuda_stream_ptr(t),) if backend == "cuda" else ()


def native_fn(backend: str, name: str) -> Callable | None:
    """Function ``name`` of the native module of ``backend`` ("cpu" or "cuda"), or None.

    None (with a one-time warning) when the module cannot be built or has no such entry point;
    callers then use the reference.
    """
    mod = cpu_ext() if backend == "cpu" else cuda_ext()
    fn = getattr(mod, name, None) if mod is not None else None
    if fn is None:
        why = (cpu_ext_error() if backend == "cpu" else cuda_ext_error()) or f"module has no {name!r}"
        warn_once(("native_fn", backend, name),
                  f"emokernels: backend {backend!r} cannot run {name} ({why}); using 'reference'")
    return fn


def _fallback(backend: str, why: str) -> str:
    warn_once(("fallback", backend, why),
              f"emokernels: backend {backend!r} is unavailable ({why}); falling back to 'reference'")
    return "reference"


def _resolve(dev: str, requested: str, from_env: bool) -> str:
    req = requested.lower()
    if req not in BACKENDS and req != "auto":
        src = "EMOKERNELS_BACKEND" if from_env else "backend"
        raise ValueError(f"unknown {src}={requested!r}; expected one of {('auto',) + BACKENDS}")
    if req == "reference":
        return "reference"
    if dev not in ("cpu", "cuda"):
        return "reference" if req == "auto" else _fallback(req, f"no {req} kernels for device {dev!r}")
    if req == "auto":
        if dev == "cuda":
            if cuda_ext() is not None:
                return "cuda"
            if triton_available():
                return "triton"
            return _fallback("cuda", f"{cuda_ext_error()}; triton: {_triton_err}")
        if cpu_ext() is not None:
            return "cpu"
        return _fallback("cpu", str(cpu_ext_error()))
    wrong_device = (req == "cpu" and dev != "cpu") or (req == "cuda" and dev != "cuda")
    if wrong_device:
        if not from_env:
            raise ValueError(f"backend={requested!r} cannot run on {dev} tensors")
        warn_once(("env-device", req, dev),
                  f"emokernels: EMOKERNELS_BACKEND={requested!r} does not apply to {dev} tensors; "
                  f"using the automatic choice for them")
        return _resolve(dev, "auto", True)
    if req == "cpu":
        return "cpu" if cpu_ext() is not None else _fallback("cpu", str(cpu_ext_error()))
    if req == "cuda":
        return "cuda" if cuda_ext() is not None else _fallback("cuda", str(cuda_ext_error()))
    # triton
    if not triton_available():
        return _fallback("triton", f"cannot import triton: {_triton_err}")
    if dev == "cpu" and not triton_interpreting():
        return _fallback("triton", "CPU tensors need TRITON_INTERPRET=1 (set before importing "
                                   "emokernels.ops)")
    return "triton"


_device_cls = torch.device
try:  # os.environ.get of a missing key raises and catches KeyError inside (about 1 us); read
    # the encoded mapping that os.environ keeps in sync (putenv + _data) directly instead.
    _env_data = os.environ._data  # type: ignore[attr-defined]
    _ENV_KEY = os.environ.encodekey("EMOKERNELS_BACKEND")  # type: ignore[attr-defined]
    _decode = os.environ.decodevalue  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - not CPython/POSIX
    _env_data, _ENV_KEY, _decode = None, None, None


def _env_backend() -> str:
    if _env_data is None:  # pragma: no cover
        return os.environ.get("EMOKERNELS_BACKEND") or "auto"
    raw = _env_data.get(_ENV_KEY)
    return _decode(raw) if raw else "auto"


def resolve_backend(tensor_device: torch.device | str, requested: str | None = None) -> str:
    """Backend name among ``"reference" | "cpu" | "triton" | "cuda"`` for tensors on ``tensor_device``.

    ``requested``: a backend name, ``"auto"``, or None (then ``$EMOKERNELS_BACKEND`` or ``"auto"``).
    """
    from_env = requested is None
    if from_env:
        requested = _env_backend()
    dev = tensor_device.type if tensor_device.__class__ is _device_cls else _device_cls(tensor_device).type
    key = (dev, requested, from_env)
    out = _cache.get(key)
    if out is None:
        out = _resolve(dev, requested, from_env)  # type: ignore[arg-type]
        # Triton on CPU depends on TRITON_INTERPRET: not cached (a test-only path anyway).
        if not (dev == "cpu" and requested.lower() == "triton"):  # type: ignore[union-attr]
            _cache[key] = out
    return out


def trace_reference(requested: str | None) -> bool:
    """Under ``torch.compile``: trace the op's pure-torch reference instead of calling the custom op?

    Yes unless a native backend was asked for by name (argument or ``$EMOKERNELS_BACKEND``).
    Inductor then fuses the edit into the kernels it writes around it (the residual add and RMSNorm
    it would write anyway) and no Python runs per call; an opaque custom op would cost a Python
    dispatch per call where CUDA graphs do not replay it (CPU), and a fusion boundary everywhere.
    """
    return (requested or _env_backend()) in ("auto", "reference")


def _reset_for_tests() -> None:
    """Forget cached resolutions and one-time warnings (tests only; keeps loaded modules)."""
    _cache.clear()
    _warned.clear()


# -- small argument helpers shared by the op files -----------------------------------------------
def opt_ptr(t) -> int:
    """``t.data_ptr()``, or 0 (a null pointer for the native kernels) when ``t`` is None."""
    return 0 if t is None else t.data_ptr()


def contiguous(t):
    """``t`` as a contiguous tensor (None stays None), copying only when needed."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def f32_contiguous(t):
    """``t`` as a contiguous fp32 tensor (None stays None): the native kernels read fp32 tables."""
    if t is None:
        return None
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return t if t.is_contiguous() else t.contiguous()


def check_devices(op: str, device: torch.device, **tensors) -> None:
    """A ValueError naming the first of ``tensors`` (None skipped) that is not on ``device``."""
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{op}: all tensors must be on {device}; {name} is on {t.device}")
