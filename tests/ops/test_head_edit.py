"""head_edit: every CPU-runnable backend against the reference (Triton under TRITON_INTERPRET=1)."""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.helpers import compile_matches_eager, op_backends, uses_custom_op

from emokernels.ops import backends
from emokernels.ops.head_edit import head_edit, head_edit_reference

he_mod = importlib.import_module("emokernels.ops.head_edit")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, T, H, hd, n): Llama-3.2-3B decode (24 x 128), hd 40 / 96 / 7 (non-powers of 2, masked
# Triton tails), hd 64, n=1, n=0, n=H (all heads), H=1 with hd=1
SHAPES = [(1, 1, 24, 128, 5), (2, 3, 6, 40, 2), (3, 2, 4, 96, 1), (2, 4, 5, 64, 0),
          (1, 4, 3, 16, 3), (2, 2, 1, 1, 1), (2, 3, 4, 7, 2)]
MODES = ["both", "scale", "add", "none"]


BACKENDS = op_backends()
NATIVE = [b for b in BACKENDS if b != "reference"]


def _inputs(B, T, H, hd, n, dtype, mode="both", E=3, seed=0):
    """(z, head_index, hd, scale, add, row_idx, strength, pos_mask)."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, T, H * hd, generator=g) * 2).to(dtype)
    head_index = torch.randperm(H, generator=g)[:n]
    scale = torch.randn(E, n, generator=g) if mode in ("both", "scale") else None
    if scale is not None and n > 0:
        scale[0, 0] = 0.0  # a zero-ablated head
    add = torch.randn(E, n, hd, generator=g) if mode in ("both", "add") else None
    row_idx = torch.randint(0, E, (B,), generator=g)
    strength = torch.rand(B, generator=g) * 2 - 0.5
    pos_mask = torch.rand(B, T, generator=g) > 0.35
    pos_mask[0, -1] = True  # at least one edited position
    if T > 1:
        pos_mask[-1, 0] = False  # at least one kept position
    return z, head_index, hd, scale, add, row_idx, strength, pos_mask


def _tol(dtype):
    return {torch.float32: dict(rtol=1e-5, atol=1e-5),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
            torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]


def _untouched(z, head_index, hd, pos_mask):
    """Boolean [B, T, H*hd]: elements that must be copied bit-exactly."""
    sel = torch.zeros(z.shape[-1] // hd, dtype=torch.bool)
    sel[head_index] = True
    sel = sel.repeat_interleave(hd)
    return ~(pos_mask[..., None] & sel)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, dtype, shape):
    args = _inputs(*shape, dtype)
    z, head_index, hd, _, _, _, _, pos_mask = args
    ref = head_edit_reference(*args)
    out = head_edit(*args, backend=backend)
    assert out.dtype == dtype and out.shape == z.shape and out.data_ptr() != z.data_ptr()
    torch.testing.assert_close(out, ref, **_tol(dtype))
    keep = _untouched(z, head_index, hd, pos_mask)
    assert torch.equal(out[keep], z[keep]), "unselected elements must be copied exactly"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_table_modes(backend, mode, dtype):
    args = _inputs(2, 3, 5, 40, 3, dtype, mode)
    ref = head_edit_reference(*args)
    torch.testing.assert_close(head_edit(*args, backend=backend), ref, **_tol(dtype))


def test_fp32_cpu_bitwise():
    args = _inputs(3, 4, 8, 40, 3, torch.float32)
    assert torch.equal(head_edit(*args, backend="cpu"), head_edit_reference(*args))


def test_matches_neuron_edit_on_expanded_channels():
    """A head edit is the neuron edit of its hd channels with the head's scale repeated."""
    from emokernels.ops.neuron_edit import neuron_edit_reference

    z, hidx, hd, scale, add, row_idx, strength, pos_mask = _inputs(2, 3, 6, 40, 2, torch.float32)
    chan = (hidx[:, None] * hd + torch.arange(hd)).reshape(-1)
    exp = neuron_edit_reference(z, chan, scale.repeat_interleave(hd, 1), add.reshape(3, -1),
                                row_idx, strength, pos_mask)
    for be in BACKENDS:
        torch.testing.assert_close(head_edit(z, hidx, hd, scale, add, row_idx, strength, pos_mask,
                                             backend=be), exp)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_error_vs_fp64(backend, dtype):
    """Error against an fp64 reference is within 2x of torch's own error in that dtype."""
    shape = (4, 16, 8, 64, 4) if backend == "cpu" else (2, 8, 4, 40, 2)
    z, hidx, hd, scale, add, row_idx, strength, pos_mask = _inputs(*shape, dtype, seed=1)
    exact = head_edit_reference(z.double(), hidx, hd, scale.double(), add.double(), row_idx,
                                strength.double(), pos_mask)
    # torch's own: the same formula evaluated entirely in `dtype`
    B, T, D = z.shape
    z4 = z.reshape(B, T, D // hd, hd)
    x = z4[:, :, hidx]
    y = x * scale.to(dtype)[row_idx][:, None, :, None] + \
        strength.to(dtype)[:, None, None, None] * add.to(dtype)[row_idx][:, None]
    naive = z4.clone()
    naive[:, :, hidx] = torch.where(pos_mask[..., None, None], y, x)
    err_torch = (naive.reshape(B, T, D).double() - exact).abs().max().item()
    out = head_edit(z, hidx, hd, scale, add, row_idx, strength, pos_mask, backend=backend)
    err = (out.double() - exact).abs().max().item()
    assert err_torch > 0
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["both", "none"])
def test_poisoned_output_fully_written(backend, dtype, mode):
    args = _inputs(2, 5, 6, 40, 3, dtype, mode)
    out = torch.full_like(args[0], float("nan"))
    res = he_mod._forward(backend, *args, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, head_edit_reference(*args), **_tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace(backend, dtype):
    args = _inputs(2, 3, 4, 40, 2, dtype)
    ref = head_edit_reference(*args)
    z2 = args[0].clone()
    with torch.no_grad():
        out = head_edit(z2, *args[1:], backend=backend, inplace=True)
    assert out is z2
    torch.testing.assert_close(z2, ref, **_tol(dtype))
    zg = args[0].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="inplace"):
        head_edit(zg, *args[1:], backend=backend, inplace=True)


@pytest.mark.parametrize("backend", NATIVE)
def test_noncontiguous_and_empty(backend):
    z, hidx, hd, scale, add, row_idx, strength, pos_mask = _inputs(3, 4, 4, 24, 2, torch.float32)
    zt = z.transpose(0, 1).contiguous().transpose(0, 1)
    assert not zt.is_contiguous()
    ref = head_edit_reference(z, hidx, hd, scale, add, row_idx, strength, pos_mask)
    torch.testing.assert_close(head_edit(zt, hidx, hd, scale, add, row_idx, strength, pos_mask,
                                         backend=backend), ref)
    add2 = add.transpose(1, 2).contiguous().transpose(1, 2)
    assert not add2.is_contiguous()
    torch.testing.assert_close(head_edit(z, hidx, hd, scale, add2, row_idx, strength, pos_mask,
                                         backend=backend), ref)
    e = head_edit(z[:, :0], hidx, hd, scale, add, row_idx, strength, pos_mask[:, :0],
                  backend=backend)
    assert e.shape == (3, 0, 96)


def test_validation_messages():
    z, hidx, hd, scale, add, row_idx, strength, pos_mask = _inputs(2, 3, 4, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        head_edit(z, hidx, 5, scale, None, row_idx, strength, pos_mask)
    with pytest.raises(ValueError, match=r"add_table.*\[E, 2, 8\]"):
        head_edit(z, hidx, hd, scale, add[:, :, :7], row_idx, strength, pos_mask)
    with pytest.raises(ValueError, match="same E"):
        head_edit(z, hidx, hd, scale, add[:2], row_idx, strength, pos_mask)
    with pytest.raises(ValueError, match="scale_table"):
        head_edit(z, hidx, hd, scale[:, :1], add, row_idx, strength, pos_mask)
    with pytest.raises(ValueError, match="n=5 > H=4"):
        head_edit(z, torch.arange(5), hd, None, None, row_idx, strength, pos_mask)
    with pytest.raises(ValueError, match="pos_mask"):
        head_edit(z, hidx, hd, scale, add, row_idx, strength, pos_mask.float())
    with pytest.raises(IndexError, match="row_idx"):
        head_edit(z, hidx, hd, scale, add, torch.tensor([3, 0]), strength, pos_mask,
                  backend="cpu")
    with pytest.raises(IndexError, match=r"head_index\[0\]"):
        head_edit(z, torch.tensor([4, 0]), hd, scale, add, row_idx, strength, pos_mask,
                  backend="cpu")


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton interpreter")
def test_triton_bad_ids_are_loud_not_out_of_bounds():
    z, hidx, hd, scale, add, row_idx, strength, pos_mask = _inputs(2, 3, 4, 8, 2, torch.float32)
    pos_mask[:] = True
    out = head_edit(z, hidx, hd, scale, add, torch.tensor([0, 5]), strength, pos_mask,
                    backend="triton")
    h = int(hidx[0])
    assert torch.isnan(out[1, :, h * hd:(h + 1) * hd]).all() and not torch.isnan(out[0]).any()
    bad = torch.tensor([9, h])
    out = head_edit(z, bad, hd, scale, add, row_idx, strength, pos_mask, backend="triton")
    untouched = torch.ones(z.shape[-1], dtype=torch.bool)
    untouched[h * hd:(h + 1) * hd] = False
    assert torch.equal(out[..., untouched], z[..., untouched])


@pytest.mark.parametrize("mode", ["both", "scale", "add"])
def test_gradcheck_fp64(mode):
    z, hidx, hd, scale, add, row_idx, strength, pos_mask = _inputs(2, 3, 3, 5, 2, torch.float64,
                                                                   mode)
    leaves = [z.requires_grad_(), strength.double().requires_grad_()]
    tables = [t.double().requires_grad_() if t is not None else None for t in (scale, add)]

    def split(tabs):
        it = iter(tabs)
        sc = next(it) if tables[0] is not None else None
        ad = next(it) if tables[1] is not None else None
        return sc, ad

    def f(z, strength, *tabs):
        sc, ad = split(tabs)
        return head_edit(z, hidx, hd, sc, ad, row_idx, strength, pos_mask)

    def f_op(z, strength, *tabs):  # the custom op's registered autograd
        sc, ad = split(tabs)
        return torch.ops.emokernels.head_edit(z, hidx, hd, sc, ad, row_idx, strength, pos_mask, "")

    inputs = (*leaves, *[t for t in tables if t is not None])
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradcheck(f_op, inputs)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_native_matches_autograd_of_reference(backend, dtype):
    z, hidx, hd, scale, add, row_idx, strength, pos_mask = _inputs(2, 3, 4, 40, 2, dtype, E=2)
    g = torch.randn(z.shape).to(dtype)
    grads = []
    for fn in (lambda *x: head_edit(*x, backend=backend), head_edit_reference):
        lv = [t.clone().requires_grad_() for t in (z, scale, add, strength)]
        out = fn(lv[0], hidx, hd, lv[1], lv[2], row_idx, lv[3], pos_mask)
        out.backward(g)
        grads.append([t.grad for t in lv])
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, **_tol(dtype))


@pytest.mark.parametrize("backend", [None, "reference", "cpu"])
def test_torch_compile_fullgraph(backend):
    # auto/reference trace the pure-torch reference (inductor fuses it); a named native backend stays one custom op
    z, hidx, hd, scale, add, row_idx, strength, pos_mask = _inputs(2, 3, 4, 40, 2, torch.float32)

    def f(z, scale, add, strength):
        y = head_edit(z * 1.5, hidx, hd, scale, add, row_idx, strength, pos_mask, backend=backend)
        return (y * y).sum()

    ops = compile_matches_eager(f, [z, scale, add, strength])
    assert uses_custom_op(ops) == (backend == "cpu")
    with torch.no_grad():  # inference graph, optional table absent
        g = torch.compile(lambda z: head_edit(z, hidx, hd, scale, None, row_idx, strength,
                                              pos_mask, backend=backend), fullgraph=True)
        torch.testing.assert_close(g(z), head_edit_reference(z, hidx, hd, scale, None, row_idx,
                                                             strength, pos_mask))
