"""gather_add on every backend and device against the reference.

The same tests run on the CPU (reference, C++, Triton under TRITON_INTERPRET=1) and, marked
``gpu``, on a CUDA device (the ``cuda`` and ``triton`` backends).
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import compile_matches_eager, op_backends, op_cases, uses_custom_op

import importlib

from emokernels.ops import backends
from emokernels.ops.gather_add import gather_add, gather_add_reference

# emokernels.ops.gather_add the attribute is the function; the module itself:
ga_mod = importlib.import_module("emokernels.ops.gather_add")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, T, d): decode, odd sizes, d=1, a non-power-of-2 d spanning two Triton blocks is not
# needed (BLOCK = next_pow2(d)), but d=577 gives a ragged tail.
SHAPES = [(1, 1, 576), (2, 3, 77), (3, 5, 128), (2, 2, 1), (1, 4, 577)]
# GPU sizes: decode at Llama-3.2-3B width, prefill, d > one Triton block
GPU_SHAPES = [(1, 1, 3072), (8, 128, 576), (2, 5, 8199), (4, 257, 3072)]

BACKENDS = op_backends()
CASES = op_cases()
NATIVE = [c for c in CASES if c.values[1] != "reference"]
gpu = pytest.mark.gpu


def _inputs(B, T, d, dtype, table_dtype=None, E=4, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, d, generator=g) * 2).to(dtype)
    table = torch.randn(E, d, generator=g).to(table_dtype or dtype)
    row_idx = torch.randint(0, E, (B,), generator=g)
    strength = torch.rand(B, generator=g) * 2 - 0.5
    pos_mask = torch.rand(B, T, generator=g) > 0.35
    pos_mask[0, -1] = True  # at least one edited position
    if T > 1:
        pos_mask[-1, 0] = False  # at least one kept position
    return tuple(t.to(device) for t in (h, table, row_idx, strength, pos_mask))


def _tol(dtype, device="cpu"):
    # fp32 on the GPU: the rms is a differently ordered fp32 sum (and Triton's sqrt may be approximate)
    return {torch.float32: dict(rtol=1e-5, atol=2e-5 if device == "cuda" else 1e-5),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
            torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [pytest.param(s, marks=gpu) for s in GPU_SHAPES],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rms_scale", [False, True])
def test_matches_reference(device, backend, dtype, shape, rms_scale):
    if shape in GPU_SHAPES and device != "cuda":
        pytest.skip("GPU-sized shape")
    h, table, row_idx, strength, pos_mask = _inputs(*shape, dtype, device=device)
    ref = gather_add_reference(h, table, row_idx, strength, pos_mask, rms_scale)
    out = gather_add(h, table, row_idx, strength, pos_mask, rms_scale=rms_scale, backend=backend)
    assert out.dtype == dtype and out.shape == h.shape and out.device == h.device
    torch.testing.assert_close(out, ref, **_tol(dtype, device))
    keep = ~pos_mask
    assert torch.equal(out[keep], h[keep]), "masked-out positions must be copied exactly"


@pytest.mark.parametrize("device,backend", NATIVE)
@pytest.mark.parametrize("table_dtype", DTYPES, ids=str)
def test_mixed_table_dtype(device, backend, table_dtype):
    shape = (3, 9, 3072) if device == "cuda" else (2, 3, 96)
    h, table, row_idx, strength, pos_mask = _inputs(*shape, torch.bfloat16, table_dtype, device=device)
    ref = gather_add_reference(h, table, row_idx, strength, pos_mask, True)
    out = gather_add(h, table, row_idx, strength, pos_mask, rms_scale=True, backend=backend)
    torch.testing.assert_close(out, ref, **_tol(torch.bfloat16))


@pytest.mark.parametrize("device,backend,shape", [("cpu", "cpu", (3, 4, 200)),
                                                  pytest.param("cuda", "cuda", (4, 33, 3072), marks=gpu)])
def test_fp32_native_bitwise_without_rms(device, backend, shape):
    """No reduction involved: the C++ / CUDA kernel rounds exactly like the reference."""
    h, table, row_idx, strength, pos_mask = _inputs(*shape, torch.float32, device=device)
    ref = gather_add_reference(h, table, row_idx, strength, pos_mask)
    assert torch.equal(gather_add(h, table, row_idx, strength, pos_mask, backend=backend), ref)


@pytest.mark.parametrize("device,backend", NATIVE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rms_scale", [False, True])
def test_low_precision_error_vs_fp64(device, backend, dtype, rms_scale):
    """Error against an fp64 reference is within 2x of torch's own error in that dtype."""
    shape = (8, 64, 3072) if device == "cuda" else (4, 16, 256) if backend == "cpu" else (2, 4, 128)
    h, table, row_idx, strength, pos_mask = _inputs(*shape, dtype, seed=1, device=device)
    exact = gather_add_reference(h.double(), table.double(), row_idx, strength.double(), pos_mask,
                                 rms_scale)
    # torch's own: the same formula evaluated entirely in `dtype`
    r = torch.sqrt(h.square().mean(-1) + 1e-12) if rms_scale else torch.ones_like(h[..., 0])
    scale = (strength.to(dtype)[:, None] * r) * pos_mask.to(dtype)
    naive = h + scale[..., None] * table[row_idx][:, None, :]
    err_torch = (naive.double() - exact).abs().max().item()
    out = gather_add(h, table, row_idx, strength, pos_mask, rms_scale=rms_scale, backend=backend)
    err = (out.double() - exact).abs().max().item()
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


@pytest.mark.parametrize("device,backend", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poisoned_output_fully_written(device, backend, dtype):
    shape = (3, 17, 1000) if device == "cuda" else (2, 5, 130)
    h, table, row_idx, strength, pos_mask = _inputs(*shape, dtype, device=device)
    out = torch.full_like(h, float("nan"))
    res = ga_mod._forward(backend, h, table, row_idx, strength, pos_mask, True, 1e-12, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, gather_add_reference(h, table, row_idx, strength, pos_mask, True),
                               **_tol(dtype, device))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace(device, backend, dtype):
    h, table, row_idx, strength, pos_mask = _inputs(2, 3, 64, dtype, device=device)
    ref = gather_add_reference(h, table, row_idx, strength, pos_mask, True)
    h2 = h.clone()
    with torch.no_grad():
        out = gather_add(h2, table, row_idx, strength, pos_mask, rms_scale=True, backend=backend,
                         inplace=True)
    assert out is h2
    torch.testing.assert_close(h2, ref, **_tol(dtype, device))
    hg = h.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="inplace"):
        gather_add(hg, table, row_idx, strength, pos_mask, backend=backend, inplace=True)


def test_noncontiguous_and_empty():
    h, table, row_idx, strength, pos_mask = _inputs(3, 4, 64, torch.float32)
    ht = h.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not ht.is_contiguous()
    ref = gather_add_reference(h, table, row_idx, strength, pos_mask, True)
    torch.testing.assert_close(gather_add(ht, table, row_idx, strength, pos_mask, rms_scale=True,
                                          backend="cpu"), ref)
    e = gather_add(h[:, :0], table, row_idx, strength, pos_mask[:, :0], backend="cpu")
    assert e.shape == (3, 0, 64)


def test_validation_messages():
    h, table, row_idx, strength, pos_mask = _inputs(2, 3, 16, torch.float32)
    with pytest.raises(ValueError, match=r"\(4, 15\).*\(2, 3, 16\)"):
        gather_add(h, table[:, :15], row_idx, strength, pos_mask)
    with pytest.raises(ValueError, match="pos_mask"):
        gather_add(h, table, row_idx, strength, pos_mask[:, :2])
    with pytest.raises(ValueError, match="row_idx"):
        gather_add(h, table, row_idx[:1], strength, pos_mask)
    with pytest.raises(TypeError, match="int64"):
        gather_add(h, table, row_idx.int(), strength, pos_mask)
    with pytest.raises(TypeError, match="bool"):
        gather_add(h, table, row_idx, strength, pos_mask.float())
    with pytest.raises(TypeError, match="fp32"):
        gather_add(h.int(), table, row_idx, strength, pos_mask)
    with pytest.raises(IndexError, match="row_idx"):  # the CPU kernel checks the range
        gather_add(h, table, torch.tensor([0, 4]), strength, pos_mask, backend="cpu")


@pytest.mark.parametrize("rms_scale", [False, True])
def test_gradcheck_fp64(rms_scale):
    h, table, row_idx, strength, pos_mask = _inputs(2, 3, 5, torch.float64, E=3)
    strength = strength.double()
    h.requires_grad_()
    table.requires_grad_()
    strength.requires_grad_()

    def f(h, table, strength):
        return gather_add(h, table, row_idx, strength, pos_mask, rms_scale=rms_scale)

    assert torch.autograd.gradcheck(f, (h, table, strength))

    def f_op(h, table, strength):  # the custom op's registered autograd
        return torch.ops.emokernels.gather_add(h, table, row_idx, strength, pos_mask, rms_scale,
                                               1e-12, "")

    assert torch.autograd.gradcheck(f_op, (h, table, strength))


@pytest.mark.parametrize("device,backend", NATIVE)
def test_grad_native_forward_matches_autograd_of_reference(device, backend):
    shape = (2, 5, 300) if device == "cuda" else (2, 3, 40)
    h, table, row_idx, strength, pos_mask = _inputs(*shape, torch.float32, device=device)
    g = torch.randn(shape).to(device)
    grads = []
    for fn in (lambda *a: gather_add(*a, rms_scale=True, backend=backend),
               lambda *a: gather_add_reference(*a, rms_scale=True)):
        leaves = [t.clone().requires_grad_() for t in (h, table, strength)]
        out = fn(leaves[0], leaves[1], row_idx, leaves[2], pos_mask)
        out.backward(g)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 if device == "cuda" else 1e-5)


@pytest.mark.parametrize("backend", [None, "reference", "cpu"])
def test_torch_compile_fullgraph(backend):
    # auto/reference trace the pure-torch reference (inductor fuses it); a named native backend stays one custom op
    h, table, row_idx, strength, pos_mask = _inputs(2, 3, 32, torch.float32)

    def f(h, table, strength):
        y = gather_add(h * 1.5, table, row_idx, strength, pos_mask, rms_scale=True, backend=backend)
        return (y * y).sum()

    assert uses_custom_op(compile_matches_eager(f, [h, table, strength])) == (backend == "cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_16bit_conversions_bitwise(dtype):
    """Every 16-bit pattern through the C++ load/store (fp32 add, RNE rounding) matches torch,
    including subnormals, overflow to inf and NaN; no reduction is involved so it is exact."""
    bits = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16)
    h = bits.view(dtype).reshape(1, 1, -1)
    g = torch.Generator().manual_seed(0)
    # deltas that cross rounding ties, the subnormal range and the overflow threshold
    table = torch.cat([torch.zeros(1, h.shape[-1]),
                       torch.randn(1, h.shape[-1], generator=g) * torch.logspace(-8, 5, h.shape[-1])])
    mask = torch.ones(1, 1, dtype=torch.bool)
    for e in (0, 1):
        args = (table, torch.tensor([e]), torch.ones(1), mask)
        out = gather_add(h, *args, backend="cpu")
        ref = gather_add_reference(h, *args)
        assert torch.equal(out.isnan(), ref.isnan())
        fin = ~ref.isnan()
        assert torch.equal(out[fin].view(torch.int16), ref[fin].view(torch.int16))


# -- CUDA only -------------------------------------------------------------------------------
@gpu
def test_auto_backend_is_cuda():
    backends._reset_for_tests()
    assert backends.resolve_backend(torch.device("cuda"), "auto") == "cuda", backends.cuda_ext_error()
    assert backends.native_fn("cuda", "gather_add") is not None


@gpu
def test_cuda_graph_capture():
    """The CUDA launcher runs on torch's current stream, so it can be captured in a graph."""
    h, table, row_idx, strength, pos_mask = _inputs(1, 1, 3072, torch.bfloat16, device="cuda")
    static_out = torch.empty_like(h)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            ga_mod._forward("cuda", h, table, row_idx, strength, pos_mask, True, 1e-12, out=static_out)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ga_mod._forward("cuda", h, table, row_idx, strength, pos_mask, True, 1e-12, out=static_out)
    h.mul_(3.0)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out,
                               gather_add_reference(h, table, row_idx, strength, pos_mask, True),
                               **_tol(torch.bfloat16))


@gpu
@pytest.mark.parametrize("backend", [None, "cuda", "triton"])
def test_torch_compile_fullgraph_cuda(backend):
    h, table, row_idx, strength, pos_mask = _inputs(2, 3, 256, torch.float32, device="cuda")

    def f(h):
        return gather_add(h * 1.5, table, row_idx, strength, pos_mask, rms_scale=True, backend=backend).sum()

    cf = torch.compile(f, fullgraph=True)  # inductor: the traced reference, or the custom op
    torch.testing.assert_close(cf(h), f(h), rtol=1e-5, atol=1e-4)
