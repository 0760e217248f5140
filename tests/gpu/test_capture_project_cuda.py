"""capture_project on a CUDA device: the ``cuda`` and ``triton`` backends against the reference."""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.gpu.common import BACKENDS, DEV, DTYPES, require_cuda

pytestmark = pytest.mark.gpu
require_cuda()

from emokernels.ops import backends  # noqa: E402
from emokernels.ops.capture_project import capture_project, capture_project_reference  # noqa: E402

cp_mod = importlib.import_module("emokernels.ops.capture_project")

# (B, T, d, K): decode, k=1, K=64, odd d, d=1, large d, many rows
SHAPES = [(1, 1, 576, 6), (1, 1, 3072, 6), (8, 128, 576, 6), (2, 3, 77, 1), (3, 5, 3072, 64),
          (2, 2, 1, 3), (2, 4, 8199, 9), (64, 16, 3072, 12)]


def _inputs(B, T, d, K, dtype, dir_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, d, generator=g).to(dtype)
    directions = torch.randn(K, d, generator=g).to(dir_dtype or dtype)
    index = torch.randint(0, T, (B,), generator=g)
    index[0] = T - 1
    return h.to(DEV), directions.to(DEV), index.to(DEV)


def _ptol(d):
    return dict(rtol=1e-4, atol=4e-5 * max(d, 1) ** 0.5)


def test_auto_backend_is_cuda():
    backends._reset_for_tests()
    assert backends.resolve_backend(DEV, "auto") == "cuda", backends.cuda_ext_error()
    assert backends.native_fn("cuda", "capture_project") is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, dtype, shape):
    h, directions, index = _inputs(*shape, dtype)
    # the reference in fp64 (a CUDA fp32 matmul may use TF32)
    P_ref = capture_project_reference(h.double(), directions.double(), index).float()
    rows_ref = h[torch.arange(shape[0], device=DEV), index]
    P, rows = capture_project(h, directions, index, copy_rows=True, backend=backend)
    assert P.dtype == torch.float32 and P.shape == (shape[0], shape[3])
    torch.testing.assert_close(P, P_ref, **_ptol(shape[2]))
    assert rows.dtype == dtype and torch.equal(rows, rows_ref)
    torch.testing.assert_close(capture_project(h, directions, index, backend=backend), P)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dir_dtype", DTYPES, ids=str)
def test_mixed_direction_dtype(backend, dir_dtype):
    h, directions, index = _inputs(4, 3, 3072, 6, torch.bfloat16, dir_dtype)
    P_ref = capture_project_reference(h.double(), directions.double(), index).float()
    torch.testing.assert_close(capture_project(h, directions, index, backend=backend), P_ref,
                               **_ptol(3072))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_error_vs_fp64(backend, dtype):
    B, T, d, K = 32, 4, 3072, 8
    h, directions, index = _inputs(B, T, d, K, dtype, seed=3)
    exact = capture_project_reference(h.double(), directions.double(), index)
    naive = h[torch.arange(B, device=DEV), index] @ directions.t()
    err_torch = (naive.double() - exact).abs().max().item()
    err = (capture_project(h, directions, index, backend=backend).double() - exact).abs().max().item()
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poisoned_outputs_fully_written(backend, dtype):
    h, directions, index = _inputs(5, 4, 700, 9, dtype)
    P = torch.full((5, 9), float("nan"), device=DEV)
    rows = torch.full((5, 700), float("nan"), dtype=dtype, device=DEV)
    cp_mod._forward(backend, h, directions, index, True, P=P, rows=rows)
    assert not torch.isnan(P).any() and not torch.isnan(rows).any()
    assert torch.equal(rows, h[torch.arange(5, device=DEV), index])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_matches_autograd_of_reference(backend):
    h, directions, index = _inputs(3, 4, 300, 5, torch.float32)
    gP, gr = torch.randn(3, 5, device=DEV), torch.randn(3, 300, device=DEV)
    grads = []
    for fn in (lambda a, b: capture_project(a, b, index, copy_rows=True, backend=backend),
               lambda a, b: capture_project_reference(a, b, index, copy_rows=True)):
        leaves = [h.clone().requires_grad_(), directions.clone().requires_grad_()]
        P, rows = fn(*leaves)
        torch.autograd.backward([P, rows], [gP, gr])
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
