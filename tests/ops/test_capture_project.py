"""capture_project on every backend and device against the reference.

The same tests run on the CPU (reference, C++, Triton under TRITON_INTERPRET=1) and, marked
``gpu``, on a CUDA device (the ``cuda`` and ``triton`` backends).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.helpers import compile_matches_eager, op_backends, op_cases, uses_custom_op

from emokernels.ops import backends
from emokernels.ops.capture_project import capture_project, capture_project_reference

cp_mod = importlib.import_module("emokernels.ops.capture_project")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, T, d, K): decode, k=1, odd d, K=64 (the maximum), d=1
SHAPES = [(1, 1, 576, 6), (2, 3, 77, 1), (3, 5, 130, 7), (2, 4, 64, 64), (2, 2, 1, 3)]
# GPU sizes: decode at Llama-3.2-3B width, prefill, K=64 at d=3072, large d, many rows
GPU_SHAPES = [(1, 1, 3072, 6), (8, 128, 576, 6), (3, 5, 3072, 64), (2, 4, 8199, 9), (64, 16, 3072, 12)]

BACKENDS = op_backends()
CASES = op_cases()
NATIVE = [c for c in CASES if c.values[1] != "reference"]
gpu = pytest.mark.gpu


def _inputs(B, T, d, K, dtype, dir_dtype=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, d, generator=g).to(dtype)
    directions = torch.randn(K, d, generator=g).to(dir_dtype or dtype)
    index = torch.randint(0, T, (B,), generator=g)
    index[0] = T - 1
    return h.to(device), directions.to(device), index.to(device)


def _ptol(dtype, d):
    # P is fp32 with fp32 accumulation in every case; differences come from summation order.
    return dict(rtol=1e-4, atol=1e-5 * max(d, 1) ** 0.5 * 4)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [pytest.param(s, marks=gpu) for s in GPU_SHAPES],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(device, backend, dtype, shape):
    if shape in GPU_SHAPES and device != "cuda":
        pytest.skip("GPU-sized shape")
    h, directions, index = _inputs(*shape, dtype, device=device)
    P_ref, rows_ref = capture_project_reference(h, directions, index, copy_rows=True)
    if device == "cuda":  # the reference in fp64 (a CUDA fp32 matmul may use TF32)
        P_ref = capture_project_reference(h.double(), directions.double(), index).float()
    P = capture_project(h, directions, index, backend=backend)
    assert P.dtype == torch.float32 and P.shape == (shape[0], shape[3])
    torch.testing.assert_close(P, P_ref, **_ptol(dtype, shape[2]))
    P2, rows = capture_project(h, directions, index, copy_rows=True, backend=backend)
    torch.testing.assert_close(P2, P_ref, **_ptol(dtype, shape[2]))
    assert rows.dtype == dtype and torch.equal(rows, rows_ref)


@pytest.mark.parametrize("device,backend", NATIVE)
@pytest.mark.parametrize("dir_dtype", DTYPES, ids=str)
def test_mixed_direction_dtype(device, backend, dir_dtype):
    B, T, d = (4, 3, 3072) if device == "cuda" else (2, 3, 100)
    h, directions, index = _inputs(B, T, d, 5, torch.bfloat16, dir_dtype, device=device)
    P_ref = capture_project_reference(h.double(), directions.double(), index).float()
    torch.testing.assert_close(capture_project(h, directions, index, backend=backend), P_ref,
                               **_ptol(None, d))


@pytest.mark.parametrize("device,backend", NATIVE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_error_vs_fp64(device, backend, dtype):
    """Error against fp64 is within 2x of torch's own (matmul in `dtype`) error."""
    B, T, d, K = (32, 4, 3072, 8) if device == "cuda" else (8, 4, 576, 8) if backend == "cpu" else (4, 2, 256, 8)
    h, directions, index = _inputs(B, T, d, K, dtype, seed=3, device=device)
    exact = capture_project_reference(h.double(), directions.double(), index)
    naive = h[torch.arange(B, device=device), index] @ directions.t()  # torch in `dtype`
    err_torch = (naive.double() - exact).abs().max().item()
    err = (capture_project(h, directions, index, backend=backend).double() - exact).abs().max().item()
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


@pytest.mark.parametrize("device,backend", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poisoned_outputs_fully_written(device, backend, dtype):
    h, directions, index = _inputs(3, 4, 70, 9, dtype, device=device)
    P = torch.full((3, 9), float("nan"), device=device)
    rows = torch.full((3, 70), float("nan"), dtype=dtype, device=device)
    P_out, rows_out = cp_mod._forward(backend, h, directions, index, True, P=P, rows=rows)
    assert P_out.data_ptr() == P.data_ptr() and rows_out.data_ptr() == rows.data_ptr()
    assert not torch.isnan(P).any() and not torch.isnan(rows).any()
    P_ref, rows_ref = capture_project_reference(h, directions, index, copy_rows=True)
    torch.testing.assert_close(P, P_ref, **_ptol(dtype, 70))
    assert torch.equal(rows, rows_ref)


def test_noncontiguous_inputs():
    h, directions, index = _inputs(3, 4, 48, 5, torch.float32)
    ht = h.transpose(0, 1).contiguous().transpose(0, 1)
    dt = directions.t().contiguous().t()
    assert not ht.is_contiguous() and not dt.is_contiguous()
    torch.testing.assert_close(capture_project(ht, dt, index, backend="cpu"),
                               capture_project_reference(h, directions, index))


def test_validation_messages():
    h, directions, index = _inputs(2, 3, 16, 4, torch.float32)
    with pytest.raises(ValueError, match=r"\(4, 15\).*\(2, 3, 16\)"):
        capture_project(h, directions[:, :15], index)
    with pytest.raises(ValueError, match="K <= 64"):
        capture_project(h, torch.randn(65, 16), index)
    with pytest.raises(ValueError, match="K <= 64"):
        capture_project(h, torch.randn(0, 16), index)
    with pytest.raises(ValueError, match="index"):
        capture_project(h, directions, index[:1])
    with pytest.raises(TypeError, match="int64"):
        capture_project(h, directions, index.int())
    with pytest.raises(IndexError, match="index"):  # the CPU kernel checks the range
        capture_project(h, directions, torch.tensor([0, 3]), backend="cpu")


@pytest.mark.parametrize("copy_rows", [False, True])
def test_gradcheck_fp64(copy_rows):
    h, directions, index = _inputs(3, 4, 5, 2, torch.float64)
    h.requires_grad_()
    directions.requires_grad_()

    def f(h, directions):
        out = capture_project(h, directions, index, copy_rows=copy_rows)
        return out if not copy_rows else (out[0], out[1])

    assert torch.autograd.gradcheck(f, (h, directions))

    def f_op(h, directions):
        P, rows = torch.ops.emokernels.capture_project(h, directions, index, copy_rows, "")
        return (P, rows) if copy_rows else P

    assert torch.autograd.gradcheck(f_op, (h, directions))


@pytest.mark.parametrize("device,backend", NATIVE)
def test_grad_native_forward_matches_autograd_of_reference(device, backend):
    B, T, d, K = (3, 4, 300, 5) if device == "cuda" else (2, 3, 40, 4)
    h, directions, index = _inputs(B, T, d, K, torch.float32, device=device)
    gP, gr = torch.randn(B, K).to(device), torch.randn(B, d).to(device)
    grads = []
    for fn in (lambda a, b: capture_project(a, b, index, copy_rows=True, backend=backend),
               lambda a, b: capture_project_reference(a, b, index, copy_rows=True)):
        leaves = [h.clone().requires_grad_(), directions.clone().requires_grad_()]
        P, rows = fn(*leaves)
        torch.autograd.backward([P, rows], [gP, gr])
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):  # (a CUDA fp32 matmul may use TF32)
        torch.testing.assert_close(a, b, **(dict(rtol=1e-3, atol=1e-3) if device == "cuda" else dict(rtol=1e-4, atol=1e-5)))


@pytest.mark.parametrize("backend", [None, "reference", "cpu"])
def test_torch_compile_fullgraph(backend):
    # auto/reference trace the pure-torch reference (inductor fuses it); a named native backend stays one custom op
    h, directions, index = _inputs(2, 3, 32, 3, torch.float32)

    def f(h, directions):
        P, rows = capture_project(h * 2.0, directions, index, copy_rows=True, backend=backend)
        return P.square().sum() + rows.sum()

    assert uses_custom_op(compile_matches_eager(f, [h, directions])) == (backend == "cpu")



@gpu
def test_auto_backend_is_cuda():
    backends._reset_for_tests()
    assert backends.resolve_backend(torch.device("cuda"), "auto") == "cuda", backends.cuda_ext_error()
    assert backends.native_fn("cuda", "capture_project") is not None
