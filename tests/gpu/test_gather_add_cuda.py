"""gather_add on a CUDA device: the ``cuda`` and ``triton`` backends against the reference."""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.gpu.common import BACKENDS, DEV, DTYPES, require_cuda, tol

pytestmark = pytest.mark.gpu
require_cuda()

from emokernels.ops import backends  # noqa: E402
from emokernels.ops.gather_add import gather_add, gather_add_reference  # noqa: E402

ga_mod = importlib.import_module("emokernels.ops.gather_add")

# (B, T, d): decode at SmolLM2 / Llama-3.2-3B width, prefill, odd sizes, d=1, d > one Triton block
SHAPES = [(1, 1, 576), (1, 1, 3072), (8, 128, 576), (3, 7, 77), (2, 2, 1), (2, 5, 8199),
          (4, 257, 3072)]


def _inputs(B, T, d, dtype, table_dtype=None, E=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, d, generator=g) * 2).to(dtype)
    table = torch.randn(E, d, generator=g).to(table_dtype or dtype)
    row_idx = torch.randint(0, E, (B,), generator=g)
    strength = torch.rand(B, generator=g) * 2 - 0.5
    pos_mask = torch.rand(B, T, generator=g) > 0.35
    pos_mask[0, -1] = True
    if T > 1:
        pos_mask[-1, 0] = False
    return tuple(t.to(DEV) for t in (h, table, row_idx, strength, pos_mask))


def _tol(dtype):
    # fp32: the rms is a differently ordered fp32 sum (and Triton's sqrt may be approximate)
    return tol(dtype, fp32_atol=2e-5)


def test_auto_backend_is_cuda():
    backends._reset_for_tests()
    assert backends.resolve_backend(DEV, "auto") == "cuda", backends.cuda_ext_error()
    assert backends.native_fn("cuda", "gather_add") is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rms_scale", [False, True])
def test_matches_reference(backend, dtype, shape, rms_scale):
    h, table, row_idx, strength, pos_mask = _inputs(*shape, dtype)
    ref = gather_add_reference(h, table, row_idx, strength, pos_mask, rms_scale)
    out = gather_add(h, table, row_idx, strength, pos_mask, rms_scale=rms_scale, backend=backend)
    assert out.dtype == dtype and out.shape == h.shape and out.device == h.device
    torch.testing.assert_close(out, ref, **_tol(dtype))
    keep = ~pos_mask
    assert torch.equal(out[keep], h[keep])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("table_dtype", DTYPES, ids=str)
def test_mixed_table_dtype(backend, table_dtype):
    h, table, row_idx, strength, pos_mask = _inputs(3, 9, 3072, torch.bfloat16, table_dtype)
    ref = gather_add_reference(h, table, row_idx, strength, pos_mask, True)
    out = gather_add(h, table, row_idx, strength, pos_mask, rms_scale=True, backend=backend)
    torch.testing.assert_close(out, ref, **_tol(torch.bfloat16))


def test_cuda_fp32_bitwise_without_rms():
    h, table, row_idx, strength, pos_mask = _inputs(4, 33, 3072, torch.float32)
    ref = gather_add_reference(h, table, row_idx, strength, pos_mask)
    assert torch.equal(gather_add(h, table, row_idx, strength, pos_mask, backend="cuda"), ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rms_scale", [False, True])
def test_low_precision_error_vs_fp64(backend, dtype, rms_scale):
    h, table, row_idx, strength, pos_mask = _inputs(8, 64, 3072, dtype, seed=1)
    exact = gather_add_reference(h.double(), table.double(), row_idx, strength.double(), pos_mask,
                                 rms_scale)
    r = torch.sqrt(h.square().mean(-1) + 1e-12) if rms_scale else torch.ones_like(h[..., 0])
    naive = h + ((strength.to(dtype)[:, None] * r) * pos_mask.to(dtype))[..., None] * \
        table[row_idx][:, None, :]
    err_torch = (naive.double() - exact).abs().max().item()
    out = gather_add(h, table, row_idx, strength, pos_mask, rms_scale=rms_scale, backend=backend)
    err = (out.double() - exact).abs().max().item()
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poisoned_output_and_inplace(backend, dtype):
    h, table, row_idx, strength, pos_mask = _inputs(3, 17, 1000, dtype)
    ref = gather_add_reference(h, table, row_idx, strength, pos_mask, True)
    out = torch.full_like(h, float("nan"))
    ga_mod._forward(backend, h, table, row_idx, strength, pos_mask, True, 1e-12, out=out)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, **_tol(dtype))
    h2 = h.clone()
    with torch.no_grad():
        gather_add(h2, table, row_idx, strength, pos_mask, rms_scale=True, backend=backend,
                   inplace=True)
    torch.testing.assert_close(h2, ref, **_tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_matches_autograd_of_reference(backend):
    h, table, row_idx, strength, pos_mask = _inputs(2, 5, 300, torch.float32)
    g = torch.randn_like(h)
    grads = []
    for fn in (lambda *a: gather_add(*a, rms_scale=True, backend=backend),
               lambda *a: gather_add_reference(*a, rms_scale=True)):
        leaves = [t.clone().requires_grad_() for t in (h, table, strength)]
        fn(leaves[0], leaves[1], row_idx, leaves[2], pos_mask).backward(g)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_cuda_graph_capture():
    """The CUDA launcher runs on torch's current stream, so it can be captured in a graph."""
    h, table, row_idx, strength, pos_mask = _inputs(1, 1, 3072, torch.bfloat16)
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


@pytest.mark.parametrize("backend", [None, "cuda", "triton"])
def test_torch_compile_fullgraph_cuda(backend):
    h, table, row_idx, strength, pos_mask = _inputs(2, 3, 256, torch.float32)

    def f(h):
        return gather_add(h * 1.5, table, row_idx, strength, pos_mask, rms_scale=True, backend=backend).sum()

    cf = torch.compile(f, fullgraph=True)  # inductor: the traced reference, or the custom op
    torch.testing.assert_close(cf(h), f(h), rtol=1e-5, atol=1e-4)
