"""Build-at-first-use of the native pybind11 modules ``emokernels_cpu`` and ``emokernels_cuda``.

Neither module includes torch headers: kernels take raw pointers (``tensor.data_ptr()``), sizes
and a dtype code, so a plain compiler call builds them in seconds and one build serves every
torch version.

* CPU: ``g++ -O3 -fopenmp -shared -fPIC -std=c++17 $(pybind11 includes)`` over
  ``csrc/cpu/*.cpp`` and ``python_bindings/cpu_module.cpp`` (compiler: ``$CXX`` or ``g++``).
* CUDA: ``nvcc -O3 -shared -Xcompiler -fPIC -std=c++17 -arch=sm_90`` (``$EMOKERNELS_CUDA_ARCH``
  overrides ``sm_90``) over ``csrc/cuda/*.cu`` and ``python_bindings/cuda_module.cpp``. Only
  attempted when ``torch.cuda.is_available()`` (see :mod:`emokernels.ops.backends`).

The entry points are declared once, in ``csrc/include/emk_ops.h``; each module file binds each
of them with one ``m.def``.

Each translation unit is compiled to an object file cached by the hash of its text, the shared
headers, the flags and the Python version (objects are compiled in parallel), then linked. The
module lands in ``$EMOKERNELS_BUILD_DIR`` or ``~/.cache/emokernels/build/<hash>/`` where
``<hash>`` covers every source (its path under the source root and its text), header, flag and
the Python version, but not where the source root lies: a checkout and an installed wheel with
the same sources share one build. Outputs are written to a temporary name and moved into place
with :func:`os.replace`, so concurrent builders never see a half-written file. A compile
failure raises :class:`BuildError` carrying the compiler output.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.machinery
import importlib.util
import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

__all__ = ["BuildError", "native_source_root", "build_base", "build_cpu", "build_cuda", "load_module"]

_KINDS = {
    "cpu": dict(module="emokernels_cpu", kernel_dir="cpu", kernel_ext=".cpp"),
    "cuda": dict(module="emokernels_cuda", kernel_dir="cuda", kernel_ext=".cu"),
}


class BuildError(RuntimeError):
    """A native module failed to compile or link; the message carries the command and output."""


def native_source_root() -> Path:
    """Directory holding ``csrc/`` and ``python_bindings/``.

    Looked up next to the package: the repository root in a checkout or an editable install
    (``<root>/emokernels/ops/_build.py`` -> ``<root>``), or the package directory itself in a
    wheel whose ``setup.py`` copied ``csrc/`` and ``python_bindings/`` into ``emokernels/``.
    ``$EMOKERNELS_SOURCE_ROOT`` overrides both.
    """
    env = os.environ.get("EMOKERNELS_SOURCE_ROOT")
    if env:
        return Path(env).resolve()
    pkg = Path(__file__).resolve().parent.parent  # .../emokernels
    for cand in (pkg.parent, pkg):
        if (cand / "csrc").is_dir() and (cand / "python_bindings").is_dir():
            return cand
    raise BuildError(
        f"emokernels native sources not found: looked for csrc/ and python_bindings/ in "
        f"{pkg.parent} and {pkg} (set EMOKERNELS_SOURCE_ROOT)"
    )


def _sources(kind: str) -> tuple[Path, list[Path], Path]:
    root = native_source_root()
    spec = _KINDS[kind]
    kernels = sorted((root / "csrc" / spec["kernel_dir"]).glob("*" + spec["kernel_ext"]))
    module_file = root / "python_bindings" / f"{kind}_module.cpp"
    return root, kernels, module_file


def _headers(root: Path) -> list[Path]:
    return sorted((root / "csrc" / "include").glob("*.h*"))


def _python_includes() -> list[str]:
    import pybind11  # noqa: PLC0415

    incs = [pybind11.get_include(), sysconfig.get_paths()["include"]]
    plat = sysconfig.get_paths().get("platinclude")
    if plat and plat not in incs:
        incs.append(plat)
    return incs


def _flags(kind: str, root: Path) -> tuple[list[str], list[str], list[str]]:
    """(compiler command, compile flags, link flags)."""
    incs = ["-I" + str(root / "csrc" / "include")] + ["-I" + p for p in _python_includes()]
    if kind == "cpu":
        cxx = shlex.split(os.environ.get("CXX", "g++"))
        cflags = ["-O3", "-fopenmp", "-fPIC", "-std=c++17", "-fvisibility=hidden", *incs]
        return cxx, cflags, ["-shared", "-fopenmp"]
    arch = os.environ.get("EMOKERNELS_CUDA_ARCH", "sm_90")
    nvcc = shlex.split(os.environ.get("EMOKERNELS_NVCC", "nvcc"))
    cflags = ["-O3", "-std=c++17", f"-arch={arch}", "-Xcompiler", "-fPIC",
              "-Xcompiler", "-fvisibility=hidden", *incs]
    return nvcc, cflags, ["-shared", f"-arch={arch}"]


def _hash(*parts: bytes) -> str:
    hsh = hashlib.sha256()
    for p in parts:
        hsh.update(hashlib.sha256(p).digest())
    return hsh.hexdigest()[:16]


def build_base() -> Path:
    """``$EMOKERNELS_BUILD_DIR`` or ``~/.cache/emokernels/build``."""
    base = os.environ.get("EMOKERNELS_BUILD_DIR")
    return Path(base) if base else Path.home() / ".cache" / "emokernels" / "build"


def _run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise BuildError(f"{what}: compiler not found: {cmd[0]!r} ({exc})") from exc
    if proc.returncode != 0:
        raise BuildError(
            f"{what} failed (exit {proc.returncode}):\n  {shlex.join(cmd)}\n"
            f"{proc.stdout}{proc.stderr}"
        )


def _build(kind: str, verbose: bool = False) -> Path:
    root, kernels, module_file = _sources(kind)
    compiler, cflags, ldflags = _flags(kind, root)
    if not module_file.is_file():
        raise BuildError(f"missing {module_file}")
    headers = _headers(root)
    header_blob = b"".join(h.name.encode() + h.read_bytes() for h in headers)
    # Cache keys name sources by their path under the source root, and the flags with the root
    # masked, so a checkout and an installed wheel holding the same sources share one build.
    flag_blob = " ".join([*compiler, *cflags, *ldflags, sys.version]).replace(str(root), "<root>").encode()

    units: list[tuple[str, bytes]] = [(str(p), p.read_bytes()) for p in [*kernels, module_file]]
    key = _hash(flag_blob, header_blob, *(Path(n).relative_to(root).as_posix().encode() + t for n, t in units))
    out_dir = build_base() / f"{kind}-{key}"
    ext_suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    target = out_dir / (_KINDS[kind]["module"] + ext_suffix)
    if target.is_file():
        return target

    obj_dir = build_base() / f"{kind}-objects"
    obj_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    def compile_one(name: str, text: bytes) -> Path:
        obj = obj_dir / f"{Path(name).stem}-{_hash(flag_blob, header_blob, text)}.o"
        if obj.is_file():
            return obj
        src = Path(name)
        tmp_obj = obj.with_name(f"{obj.name}.{os.getpid()}.tmp.o")
        cmd = [*compiler, *cflags, "-c", str(src), "-o", str(tmp_obj)]
        if verbose:
            print("[emokernels build]", shlex.join(cmd), file=sys.stderr)
        _run(cmd, f"compiling {src.name} for emokernels_{kind}")
        os.replace(tmp_obj, obj)
        return obj

    workers = max(1, min(len(units), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        objs = list(pool.map(lambda u: compile_one(*u), units))
    tmp_target = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    cmd = [*compiler, *ldflags, *map(str, objs), "-o", str(tmp_target)]
    _run(cmd, f"linking emokernels_{kind}")
    os.replace(tmp_target, target)
    return target


def load_module(path: Path, name: str) -> ModuleType:
    """Import the extension module at ``path`` under ``name`` (not added to sys.path)."""
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, str(path))
    if spec is None or spec.loader is None:
        raise BuildError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[name] = mod
    return mod


def build_cpu(verbose: bool = False) -> ModuleType:
    """Build (if needed) and import ``emokernels_cpu``. Raises :class:`BuildError`."""
    return load_module(_build("cpu", verbose), "emokernels_cpu")


def build_cuda(verbose: bool = False) -> ModuleType:
    """Build (if needed) and import ``emokernels_cuda``. Raises :class:`BuildError`."""
    return load_module(_build("cuda", verbose), "emokernels_cuda")


if __name__ == "__main__":  # python -m emokernels.ops._build [cpu|cuda]
    for k in sys.argv[1:] or ["cpu"]:
        m = build_cpu(True) if k == "cpu" else build_cuda(True)
        print(k, "->", m.__file__)
