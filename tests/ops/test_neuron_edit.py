"""neuron_edit: every CPU-runnable backend against the reference (Triton under TRITON_INTERPRET=1)."""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.helpers import compile_matches_eager, op_backends, uses_custom_op

from emokernels.ops import backends
from emokernels.ops.neuron_edit import neuron_edit, neuron_edit_reference

ne_mod = importlib.import_module("emokernels.ops.neuron_edit")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, T, N, n): decode (T=1, Llama-ish n=29), odd N, n=1, n=0, n=N (all channels), N=1
SHAPES = [(1, 1, 576, 29), (2, 3, 77, 7), (3, 5, 128, 1), (2, 4, 37, 0), (1, 4, 19, 19),
          (2, 2, 1, 1)]
MODES = ["both", "scale", "add", "none"]


BACKENDS = op_backends()
NATIVE = [b for b in BACKENDS if b != "reference"]


def _inputs(B, T, N, n, dtype, mode="both", E=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(B, T, N, generator=g) * 2).to(dtype)
    index = torch.randperm(N, generator=g)[:n]
    scale = torch.randn(E, n, generator=g) if mode in ("both", "scale") else None
    if scale is not None and n > 0:
        scale[0, 0] = 0.0  # a zero-ablated neuron
    add = torch.randn(E, n, generator=g) if mode in ("both", "add") else None
    row_idx = torch.randint(0, E, (B,), generator=g)
    strength = torch.rand(B, generator=g) * 2 - 0.5
    pos_mask = torch.rand(B, T, generator=g) > 0.35
    pos_mask[0, -1] = True  # at least one edited position
    if T > 1:
        pos_mask[-1, 0] = False  # at least one kept position
    return a, index, scale, add, row_idx, strength, pos_mask


def _tol(dtype):
    return {torch.float32: dict(rtol=1e-5, atol=1e-5),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
            torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]


def _untouched(a, index, pos_mask):
    """Boolean [B, T, N]: elements that must be copied bit-exactly."""
    sel = torch.zeros(a.shape[-1], dtype=torch.bool)
    sel[index] = True
    return ~(pos_mask[..., None] & sel)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, dtype, shape):
    args = _inputs(*shape, dtype)
    a, index, _, _, _, _, pos_mask = args
    ref = neuron_edit_reference(*args)
    out = neuron_edit(*args, backend=backend)
    assert out.dtype == dtype and out.shape == a.shape and out.data_ptr() != a.data_ptr()
    torch.testing.assert_close(out, ref, **_tol(dtype))
    keep = _untouched(a, index, pos_mask)
    assert torch.equal(out[keep], a[keep]), "unselected elements must be copied exactly"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_table_modes(backend, mode, dtype):
    args = _inputs(2, 3, 50, 9, dtype, mode)
    ref = neuron_edit_reference(*args)
    torch.testing.assert_close(neuron_edit(*args, backend=backend), ref, **_tol(dtype))


def test_fp32_cpu_bitwise():
    """One multiply and one add in fp32: the C++ kernel rounds exactly like the reference."""
    args = _inputs(3, 4, 200, 31, torch.float32)
    assert torch.equal(neuron_edit(*args, backend="cpu"), neuron_edit_reference(*args))


def test_semantics_by_hand():
    """Zero-ablation, enhancement and the per-row table choice, on values checked by hand."""
    a = torch.arange(2 * 2 * 5, dtype=torch.float32).reshape(2, 2, 5)
    index = torch.tensor([3, 1])
    scale = torch.tensor([[0.0, 1.0], [2.0, 0.5]])
    add = torch.tensor([[1.0, 2.0], [10.0, 20.0]])
    row_idx = torch.tensor([1, 0])
    strength = torch.tensor([1.0, 3.0])
    pos_mask = torch.tensor([[True, False], [False, True]])
    exp = a.clone()
    exp[0, 0, 3] = a[0, 0, 3] * 2.0 + 1.0 * 10.0
    exp[0, 0, 1] = a[0, 0, 1] * 0.5 + 1.0 * 20.0
    exp[1, 1, 3] = 0.0 + 3.0 * 1.0
    exp[1, 1, 1] = a[1, 1, 1] + 3.0 * 2.0
    for be in BACKENDS:
        torch.testing.assert_close(neuron_edit(a, index, scale, add, row_idx, strength, pos_mask,
                                               backend=be), exp)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_error_vs_fp64(backend, dtype):
    """Error against an fp64 reference is within 2x of torch's own error in that dtype."""
    shape = (4, 16, 256, 64) if backend == "cpu" else (2, 8, 96, 32)
    a, index, scale, add, row_idx, strength, pos_mask = _inputs(*shape, dtype, seed=1)
    exact = neuron_edit_reference(a.double(), index, scale.double(), add.double(), row_idx,
                                  strength.double(), pos_mask)
    # torch's own: the same formula evaluated entirely in `dtype`
    x = a[..., index]
    y = x * scale.to(dtype)[row_idx][:, None] + strength.to(dtype)[:, None, None] * \
        add.to(dtype)[row_idx][:, None]
    naive = a.clone()
    naive[..., index] = torch.where(pos_mask[..., None], y, x)
    err_torch = (naive.double() - exact).abs().max().item()
    out = neuron_edit(a, index, scale, add, row_idx, strength, pos_mask, backend=backend)
    err = (out.double() - exact).abs().max().item()
    assert err_torch > 0
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["both", "none"])
def test_poisoned_output_fully_written(backend, dtype, mode):
    args = _inputs(2, 5, 130, 17, dtype, mode)
    out = torch.full_like(args[0], float("nan"))
    res = ne_mod._forward(backend, *args, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, neuron_edit_reference(*args), **_tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace(backend, dtype):
    args = _inputs(2, 3, 64, 11, dtype)
    ref = neuron_edit_reference(*args)
    a2 = args[0].clone()
    with torch.no_grad():
        out = neuron_edit(a2, *args[1:], backend=backend, inplace=True)
    assert out is a2
    torch.testing.assert_close(a2, ref, **_tol(dtype))
    ag = args[0].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="inplace"):
        neuron_edit(ag, *args[1:], backend=backend, inplace=True)


@pytest.mark.parametrize("backend", NATIVE)
def test_noncontiguous_and_empty(backend):
    a, index, scale, add, row_idx, strength, pos_mask = _inputs(3, 4, 64, 5, torch.float32)
    at = a.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not at.is_contiguous()
    ref = neuron_edit_reference(a, index, scale, add, row_idx, strength, pos_mask)
    torch.testing.assert_close(neuron_edit(at, index, scale, add, row_idx, strength, pos_mask,
                                           backend=backend), ref)
    # non-contiguous tables and index
    sc2 = torch.stack([scale, scale], -1)[..., 0]
    idx2 = torch.stack([index, index], 1)[:, 0]
    assert not sc2.is_contiguous() and not idx2.is_contiguous()
    torch.testing.assert_close(neuron_edit(a, idx2, sc2, add, row_idx, strength, pos_mask,
                                           backend=backend), ref)
    e = neuron_edit(a[:, :0], index, scale, add, row_idx, strength, pos_mask[:, :0],
                    backend=backend)
    assert e.shape == (3, 0, 64)


def test_validation_messages():
    a, index, scale, add, row_idx, strength, pos_mask = _inputs(2, 3, 16, 4, torch.float32)
    with pytest.raises(ValueError, match=r"scale_table.*\(3, 3\)"):
        neuron_edit(a, index, scale[:, :3], add, row_idx, strength, pos_mask)
    with pytest.raises(ValueError, match="same E"):
        neuron_edit(a, index, scale, add[:2], row_idx, strength, pos_mask)
    with pytest.raises(ValueError, match="pos_mask"):
        neuron_edit(a, index, scale, add, row_idx, strength, pos_mask[:, :2])
    with pytest.raises(ValueError, match="row_idx"):
        neuron_edit(a, index, scale, add, row_idx.int(), strength, pos_mask)
    with pytest.raises(TypeError, match="index"):
        neuron_edit(a, index.int(), scale, add, row_idx, strength, pos_mask)
    with pytest.raises(ValueError, match="n=17 > N=16"):
        neuron_edit(a, torch.arange(17), None, None, row_idx, strength, pos_mask)
    with pytest.raises(TypeError, match="fp32"):
        neuron_edit(a.int(), index, scale, add, row_idx, strength, pos_mask)
    # the CPU kernel checks the ranges before writing anything
    with pytest.raises(IndexError, match="row_idx"):
        neuron_edit(a, index, scale, add, torch.tensor([0, 3]), strength, pos_mask, backend="cpu")
    with pytest.raises(IndexError, match=r"index\[1\]"):
        neuron_edit(a, torch.tensor([0, 16]), None, add[:, :2], row_idx, strength, pos_mask,
                    backend="cpu")


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton interpreter")
def test_triton_bad_ids_are_loud_not_out_of_bounds():
    """No host sync in Triton/CUDA: a bad row id gives NaN, a bad channel id is skipped."""
    a, index, scale, add, row_idx, strength, pos_mask = _inputs(2, 3, 16, 4, torch.float32)
    pos_mask[:] = True
    out = neuron_edit(a, index, scale, add, torch.tensor([0, 7]), strength, pos_mask,
                      backend="triton")
    assert torch.isnan(out[1][:, index]).all() and not torch.isnan(out[0]).any()
    bad = index.clone()
    bad[1] = 99
    out = neuron_edit(a, bad, scale, add, row_idx, strength, pos_mask, backend="triton")
    assert torch.equal(out[..., index[1]], a[..., index[1]])


@pytest.mark.parametrize("mode", ["both", "scale", "add"])
def test_gradcheck_fp64(mode):
    a, index, scale, add, row_idx, strength, pos_mask = _inputs(2, 3, 6, 3, torch.float64, mode)
    leaves = [a.requires_grad_(), strength.double().requires_grad_()]
    tables = [t.double().requires_grad_() if t is not None else None for t in (scale, add)]

    def f(a, strength, *tabs):
        it = iter(tabs)
        sc = next(it) if tables[0] is not None else None
        ad = next(it) if tables[1] is not None else None
        return neuron_edit(a, index, sc, ad, row_idx, strength, pos_mask)

    inputs = (*leaves, *[t for t in tables if t is not None])
    assert torch.autograd.gradcheck(f, inputs)

    def f_op(a, strength, *tabs):  # the custom op's registered autograd
        it = iter(tabs)
        sc = next(it) if tables[0] is not None else None
        ad = next(it) if tables[1] is not None else None
        return torch.ops.emokernels.neuron_edit(a, index, sc, ad, row_idx, strength, pos_mask, "")

    assert torch.autograd.gradcheck(f_op, inputs)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_native_matches_autograd_of_reference(backend, dtype):
    a, index, scale, add, row_idx, strength, pos_mask = _inputs(2, 3, 40, 6, dtype, E=2)
    g = torch.randn(2, 3, 40).to(dtype)
    grads = []
    for fn in (lambda *x: neuron_edit(*x, backend=backend), neuron_edit_reference):
        lv = [t.clone().requires_grad_() for t in (a, scale, add, strength)]
        out = fn(lv[0], index, lv[1], lv[2], row_idx, lv[3], pos_mask)
        out.backward(g)
        grads.append([t.grad for t in lv])
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, **_tol(dtype))


@pytest.mark.parametrize("backend", [None, "reference", "cpu"])
def test_torch_compile_fullgraph(backend):
    # auto/reference trace the pure-torch reference (inductor fuses it); a named native backend stays one custom op
    a, index, scale, add, row_idx, strength, pos_mask = _inputs(2, 3, 32, 5, torch.float32)

    def f(a, scale, add, strength):
        y = neuron_edit(a * 1.5, index, scale, add, row_idx, strength, pos_mask, backend=backend)
        return (y * y).sum()

    ops = compile_matches_eager(f, [a, scale, add, strength])
    assert uses_custom_op(ops) == (backend == "cpu")
    with torch.no_grad():  # inference graph, optional table absent
        g = torch.compile(lambda a: neuron_edit(a, index, None, add, row_idx, strength, pos_mask,
                                                backend=backend), fullgraph=True)
        torch.testing.assert_close(g(a), neuron_edit_reference(a, index, None, add, row_idx,
                                                               strength, pos_mask))
