"""gather_add: every CPU-runnable backend against the reference (Triton under TRITON_INTERPRET=1)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import compile_matches_eager, op_backends, uses_custom_op

import importlib

from emokernels.ops import backends
from emokernels.ops.gather_add import gather_add, gather_add_reference

# emokernels.ops.gather_add the attribute is the function; the module itself:
ga_mod = importlib.import_module("emokernels.ops.gather_add")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, T, d): decode, odd sizes, d=1, a non-power-of-2 d spanning two Triton blocks is not
# needed (BLOCK = next_pow2(d)), but d=577 gives a ragged tail.
SHAPES = [(1, 1, 576), (2, 3, 77), (3, 5, 128), (2, 2, 1), (1, 4, 577)]


BACKENDS = op_backends()


def _inputs(B, T, d, dtype, table_dtype=None, E=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, d, generator=g) * 2).to(dtype)
    table = torch.randn(E, d, generator=g).to(table_dtype or dtype)
    row_idx = torch.randint(0, E, (B,), generator=g)
    strength = torch.rand(B, generator=g) * 2 - 0.5
    pos_mask = torch.rand(B, T, generator=g) > 0.35
    pos_mask[0, -1] = True  # at least one edited position
    if T > 1:
        pos_mask[-1, 0] = False  # at least one kept position
    return h, table, row_idx, strength, pos_mask


def _tol(dtype):
    return {torch.float32: dict(rtol=1e-5, atol=1e-5),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
            torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rms_scale", [False, True])
def test_matches_reference(backend, dtype, shape, rms_scale):
    h, table, row_idx, strength, pos_mask = _inputs(*shape, dtype)
    ref = gather_add_reference(h, table, row_idx, strength, pos_mask, rms_scale)
    out = gather_add(h, table, row_idx, strength, pos_mask, rms_scale=rms_scale, backend=backend)
    assert out.dtype == dtype and out.shape == h.shape
    torch.testing.assert_close(out, ref, **_tol(dtype))
    keep = ~pos_mask
    assert torch.equal(out[keep], h[keep]), "masked-out positions must be copied exactly"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("table_dtype", DTYPES, ids=str)
def test_mixed_table_dtype(backend, table_dtype):
    h, table, row_idx, strength, pos_mask = _inputs(2, 3, 96, torch.bfloat16, table_dtype)
    ref = gather_add_reference(h, table, row_idx, strength, pos_mask, True)
    out = gather_add(h, table, row_idx, strength, pos_mask, rms_scale=True, backend=backend)
    torch.testing.assert_close(out, ref, **_tol(torch.bfloat16))


def test_fp32_cpu_bitwise_without_rms():
    """No reduction involved: the C++ kernel rounds exactly like the reference."""
    h, table, row_idx, strength, pos_mask = _inputs(3, 4, 200, torch.float32)
    ref = gather_add_reference(h, table, row_idx, strength, pos_mask)
    assert torch.equal(gather_add(h, table, row_idx, strength, pos_mask, backend="cpu"), ref)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rms_scale", [False, True])
def test_low_precision_error_vs_fp64(backend, dtype, rms_scale):
    """Error against an fp64 reference is within 2x of torch's own error in that dtype."""
    shape = (4, 16, 256) if backend == "cpu" else (2, 4, 128)
    h, table, row_idx, strength, pos_mask = _inputs(*shape, dtype, seed=1)
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


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poisoned_output_fully_written(backend, dtype):
    h, table, row_idx, strength, pos_mask = _inputs(2, 5, 130, dtype)
    out = torch.full_like(h, float("nan"))
    res = ga_mod._forward(backend, h, table, row_idx, strength, pos_mask, True, 1e-12, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, gather_add_reference(h, table, row_idx, strength, pos_mask, True),
                               **_tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace(backend):
    h, table, row_idx, strength, pos_mask = _inputs(2, 3, 64, torch.float32)
    ref = gather_add_reference(h, table, row_idx, strength, pos_mask, True)
    h2 = h.clone()
    with torch.no_grad():
        out = gather_add(h2, table, row_idx, strength, pos_mask, rms_scale=True, backend=backend,
                         inplace=True)
    assert out is h2
    torch.testing.assert_close(h2, ref, rtol=1e-5, atol=1e-5)
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


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_grad_native_forward_matches_autograd_of_reference(backend):
    h, table, row_idx, strength, pos_mask = _inputs(2, 3, 40, torch.float32)
    g = torch.randn(2, 3, 40)
    grads = []
    for fn in (lambda *a: gather_add(*a, rms_scale=True, backend=backend),
               lambda *a: gather_add_reference(*a, rms_scale=True)):
        leaves = [t.clone().requires_grad_() for t in (h, table, strength)]
        out = fn(leaves[0], leaves[1], row_idx, leaves[2], pos_mask)
        out.backward(g)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


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
