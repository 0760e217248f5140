"""Backend resolution, fallbacks and the native build."""
from __future__ import annotations

import warnings

import pytest
import torch

from emokernels.ops import _build, backends, resolve_backend


@pytest.fixture(autouse=True)
def _fresh_resolution(monkeypatch):
    monkeypatch.delenv("EMOKERNELS_BACKEND", raising=False)
    backends._reset_for_tests()
    yield
    backends._reset_for_tests()


def test_auto_on_cpu_picks_the_cpp_module():
    assert backends.cpu_ext() is not None, backends.cpu_ext_error()
    assert resolve_backend(torch.device("cpu")) == "cpu"
    assert resolve_backend("cpu", "auto") == "cpu"
    assert resolve_backend("cpu", "reference") == "reference"
    assert backends.cpu_ext() is backends.cpu_ext()  # cached


def test_env_var(monkeypatch):
    monkeypatch.setenv("EMOKERNELS_BACKEND", "reference")
    assert resolve_backend(torch.device("cpu")) == "reference"
    assert resolve_backend(torch.device("cpu"), "cpu") == "cpu"  # the argument wins
    monkeypatch.setenv("EMOKERNELS_BACKEND", "cuda")  # does not apply to CPU tensors: warn, auto
    with pytest.warns(RuntimeWarning, match="EMOKERNELS_BACKEND"):
        assert resolve_backend(torch.device("cpu")) == "cpu"
    monkeypatch.setenv("EMOKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="EMOKERNELS_BACKEND"):
        resolve_backend(torch.device("cpu"))


def test_wrong_device_or_name_is_an_error():
    with pytest.raises(ValueError, match="cannot run on cpu"):
        resolve_backend(torch.device("cpu"), "cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend(torch.device("cpu"), "fast")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if not backends.triton_available():
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("cpu", "triton") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.warns(RuntimeWarning, match="'triton'.*TRITON_INTERPRET"):
        assert resolve_backend("cpu", "triton") == "reference"


def test_unavailable_cpu_module_falls_back_once(monkeypatch):
    monkeypatch.setattr(backends, "_cpu", None)
    monkeypatch.setattr(backends, "_cpu_err", "BuildError: simulated")
    with pytest.warns(RuntimeWarning, match="'cpu' is unavailable.*simulated"):
        assert resolve_backend("cpu") == "reference"
    backends._cache.clear()  # resolve again: the warning is not repeated
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("cpu", "cpu") == "reference"
    # the op still computes the right thing through the reference
    from emokernels.ops import gather_add, gather_add_reference

    h = torch.randn(1, 2, 8)
    args = (torch.randn(2, 8), torch.tensor([1]), torch.ones(1), torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(gather_add(h, *args), gather_add_reference(h, *args))


def test_cuda_unavailable_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert backends.cuda_ext() is None
    assert "is_available" in backends.cuda_ext_error()


def test_native_source_root_and_module_exports():
    root = _build.native_source_root()
    assert (root / "csrc" / "include" / "emk_common.h").is_file()
    assert (root / "python_bindings" / "cpu_module.cpp").is_file()
    mod = backends.cpu_ext()
    assert hasattr(mod, "gather_add") and hasattr(mod, "capture_project")
    assert mod.num_threads() >= 1


def test_build_failure_reports_compiler_output(tmp_path, monkeypatch):
    root = tmp_path / "src"
    (root / "csrc" / "cpu").mkdir(parents=True)
    (root / "csrc" / "include").mkdir()
    (root / "python_bindings" / "cpu").mkdir(parents=True)
    (root / "python_bindings" / "cpu_module.cpp").write_text("#error emk_deliberate_failure\n")
    monkeypatch.setenv("EMOKERNELS_SOURCE_ROOT", str(root))
    monkeypatch.setenv("EMOKERNELS_BUILD_DIR", str(tmp_path / "build"))
    with pytest.raises(_build.BuildError, match="emk_deliberate_failure"):
        _build._build("cpu")


def test_public_exports():
    import emokernels.ops as ops

    for name in ("gather_add", "capture_project", "resolve_backend"):
        assert callable(getattr(ops, name))
    assert "sparse_edit" in ops.__all__ and "fused_add_rmsnorm" in ops.__all__


def _launcher_inputs(op: str):
    """Small valid arguments of each op's backend runners (after the backend name)."""
    z, rows, s, mask = torch.randn(1, 2, 8), torch.tensor([1]), torch.ones(1), torch.ones(1, 2, dtype=torch.bool)
    return {
        "sparse_edit/heads": (z, torch.tensor([1]), 4, torch.ones(2, 1), torch.ones(2, 1, 4), rows, s, mask, torch.empty_like(z)),
        "sparse_edit/neurons": (z, torch.tensor([3]), 1, torch.ones(2, 1), torch.ones(2, 1), rows, s, mask, torch.empty_like(z)),
        "gather_add": (z, torch.randn(2, 8), rows, s, mask, False, 1e-6, torch.empty_like(z)),
        "capture_project": (z, torch.randn(3, 8), torch.tensor([1]), torch.empty(1, 3), torch.empty(1, 8)),
    }[op]


@pytest.mark.parametrize("op", ["sparse_edit/heads", "sparse_edit/neurons", "gather_add", "capture_project"])
def test_cuda_launcher_gets_the_cpu_arguments_plus_the_stream(op, monkeypatch):
    """One argument list serves both native modules; the CUDA binding takes the stream last."""
    import importlib

    from emokernels.ops import _op

    name = op.split("/")[0]
    mod = importlib.import_module(f"emokernels.ops.{name}")
    calls = {}
    monkeypatch.setattr(_op, "_NATIVE", {})  # forget the functions looked up before
    monkeypatch.setattr(_op, "native_fn", lambda backend, fn_name: lambda *a: calls.setdefault((backend, fn_name), a))
    monkeypatch.setattr(backends, "cuda_stream_ptr", lambda t: 12345)
    args = _launcher_inputs(op)
    for backend in ("cpu", "cuda"):
        mod._RUNNERS[backend](*args)
    assert calls[("cuda", name)] == calls[("cpu", name)] + (12345,)
