"""sparse_edit (MLP neurons: group 1; attention heads: group head_dim) on every backend and device.

The same tests run on the CPU (reference, C++, Triton under TRITON_INTERPRET=1) and, marked
``gpu``, on a CUDA device (the ``cuda`` and ``triton`` backends).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.helpers import compile_matches_eager, op_backends, op_cases, uses_custom_op

from emokernels.ops import backends
from emokernels.ops.sparse_edit import sparse_edit, sparse_edit_reference

se_mod = importlib.import_module("emokernels.ops.sparse_edit")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MODES = ["both", "scale", "add", "none"]
CASES = op_cases()
NATIVE = [c for c in CASES if c.values[1] != "reference"]
gpu = pytest.mark.gpu

# (B, T, G, group, n). Neurons (group 1): decode (T=1, Llama-ish n=29), odd N, n=1, n=0, n=N, N=1.
# Heads: Llama-3.2-3B decode (24 x 128), head_dim 40 / 96 / 7 (non-powers of 2, masked Triton
# tails), 64, n=1, n=0, n=H. Then the GPU sizes: decode and prefill at Llama widths, a large n.
SHAPES = [(1, 1, 576, 1, 29), (2, 3, 77, 1, 7), (3, 5, 128, 1, 1), (2, 4, 37, 1, 0),
          (1, 4, 19, 1, 19), (2, 2, 1, 1, 1),
          (1, 1, 24, 128, 5), (2, 3, 6, 40, 2), (3, 2, 4, 96, 1), (2, 4, 5, 64, 0),
          (1, 4, 3, 16, 3), (2, 3, 4, 7, 2)]
GPU_SHAPES = [(1, 1, 8192, 1, 29), (4, 257, 8192, 1, 29), (2, 1024, 3000, 1, 600),
              (4, 257, 24, 128, 12), (2, 33, 16, 64, 5), (3, 70, 4, 96, 1), (2, 9, 4, 7, 2)]
# one small shape per kind: (G, group, n)
KINDS = {"neurons": (50, 1, 9), "heads": (6, 40, 2)}


def _inputs(B, T, G, g, n, dtype, mode="both", E=3, seed=0, device="cpu"):
    """(a, index, group, scale, add, row_idx, strength, pos_mask); neuron add tables are [E, n]."""
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(B, T, G * g, generator=gen) * 2).to(dtype)
    index = torch.randperm(G, generator=gen)[:n]
    scale = torch.randn(E, n, generator=gen) if mode in ("both", "scale") else None
    if scale is not None and n > 0:
        scale[0, 0] = 0.0  # a zero-ablated neuron / head
    add = torch.randn(E, n, g, generator=gen) if mode in ("both", "add") else None
    if add is not None and g == 1:
        add = add[..., 0]  # the engine's neuron tables
    row_idx = torch.randint(0, E, (B,), generator=gen)
    strength = torch.rand(B, generator=gen) * 2 - 0.5
    pos_mask = torch.rand(B, T, generator=gen) > 0.35
    pos_mask[0, -1] = True  # at least one edited position
    if T > 1:
        pos_mask[-1, 0] = False  # at least one kept position
    mv = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return tuple(mv(t) for t in (a, index, g, scale, add, row_idx, strength, pos_mask))


def _kind(kind, dtype, mode="both", B=2, T=3, **kw):
    G, g, n = KINDS[kind]
    return _inputs(B, T, G, g, n, dtype, mode, **kw)


def _tol(dtype):
    return {torch.float32: dict(rtol=1e-5, atol=1e-5),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
            torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]


def _untouched(a, index, g, pos_mask):
    """Boolean [B, T, N]: elements that must be copied bit-exactly."""
    sel = torch.zeros(a.shape[-1] // g, dtype=torch.bool, device=a.device)
    sel[index] = True
    return ~(pos_mask[..., None] & sel.repeat_interleave(g))


def _shape_id(s):
    return "x".join(map(str, s))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [pytest.param(s, marks=gpu) for s in GPU_SHAPES], ids=_shape_id)
def test_matches_reference(device, backend, dtype, shape):
    if shape in GPU_SHAPES and device != "cuda":
        pytest.skip("GPU-sized shape")
    args = _inputs(*shape, dtype, device=device)
    a, index, g, _, _, _, _, pos_mask = args
    ref = sparse_edit_reference(*args)
    out = sparse_edit(*args, backend=backend)
    assert out.dtype == dtype and out.shape == a.shape and out.data_ptr() != a.data_ptr()
    torch.testing.assert_close(out, ref, **_tol(dtype))
    keep = _untouched(a, index, g, pos_mask)
    assert torch.equal(out[keep], a[keep]), "unselected elements must be copied exactly"
    if backend in ("cpu", "cuda") and dtype == torch.float32:  # fp32 math, one rounding
        assert torch.equal(out, ref)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_table_modes(device, backend, kind, mode, dtype):
    args = _kind(kind, dtype, mode, device=device)
    torch.testing.assert_close(sparse_edit(*args, backend=backend), sparse_edit_reference(*args),
                               **_tol(dtype))


@pytest.mark.parametrize("shape", [(3, 4, 200, 1, 31), (2, 3, 8, 24, 3)], ids=_shape_id)
def test_fp32_cpu_bitwise(shape):
    """One multiply and one add in fp32: the C++ kernel rounds exactly like the reference."""
    args = _inputs(*shape, torch.float32)
    assert torch.equal(sparse_edit(*args, backend="cpu"), sparse_edit_reference(*args))


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
    for be in op_backends():
        torch.testing.assert_close(sparse_edit(a, index, 1, scale, add, row_idx, strength, pos_mask,
                                               backend=be), exp)


def test_a_head_is_a_group_of_channels():
    """A head edit is the group-1 edit of its head_dim channels with the head's scale repeated."""
    z, hidx, hd, scale, add, row_idx, strength, pos_mask = _kind("heads", torch.float32)
    chan = (hidx[:, None] * hd + torch.arange(hd)).reshape(-1)
    exp = sparse_edit_reference(z, chan, 1, scale.repeat_interleave(hd, 1), add.reshape(3, -1),
                                row_idx, strength, pos_mask)
    for be in op_backends():
        torch.testing.assert_close(sparse_edit(z, hidx, hd, scale, add, row_idx, strength, pos_mask,
                                               backend=be), exp)


@pytest.mark.parametrize("device,backend", NATIVE)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_error_vs_fp64(device, backend, kind, dtype):
    """Error against an fp64 reference is within 2x of torch's own error in that dtype."""
    big = backend in ("cpu", "cuda")
    shape = {"neurons": (4, 16, 256, 1, 64) if big else (2, 8, 96, 1, 32),
             "heads": (4, 16, 8, 64, 4) if big else (2, 8, 4, 40, 2)}[kind]
    a, index, g, scale, add, row_idx, strength, pos_mask = _inputs(*shape, dtype, seed=1, device=device)
    exact = sparse_edit_reference(a.double(), index, g, scale.double(), add.double(), row_idx,
                                  strength.double(), pos_mask)
    # torch's own: the same formula evaluated entirely in `dtype`
    B, T, N = a.shape
    a4 = a.reshape(B, T, N // g, g)
    x = a4[:, :, index]
    y = x * scale.to(dtype)[row_idx][:, None, :, None] + strength.to(dtype)[:, None, None, None] * \
        add.reshape(-1, index.numel(), g).to(dtype)[row_idx][:, None]
    naive = a4.clone()
    naive[:, :, index] = torch.where(pos_mask[..., None, None], y, x)
    err_torch = (naive.reshape(B, T, N).double() - exact).abs().max().item()
    out = sparse_edit(a, index, g, scale, add, row_idx, strength, pos_mask, backend=backend)
    err = (out.double() - exact).abs().max().item()
    assert err_torch > 0
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


@pytest.mark.parametrize("device,backend", NATIVE)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["both", "none"])
def test_poisoned_output_fully_written(device, backend, kind, dtype, mode):
    args = _kind(kind, dtype, mode, B=2, T=5, device=device)
    out = torch.full_like(args[0], float("nan"))
    res = se_mod._forward(backend, *args, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, sparse_edit_reference(*args), **_tol(dtype))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace(device, backend, kind, dtype):
    args = _kind(kind, dtype, device=device)
    ref = sparse_edit_reference(*args)
    a2 = args[0].clone()
    with torch.no_grad():
        out = sparse_edit(a2, *args[1:], backend=backend, inplace=True)
    assert out is a2
    torch.testing.assert_close(a2, ref, **_tol(dtype))
    ag = args[0].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="inplace"):
        sparse_edit(ag, *args[1:], backend=backend, inplace=True)


@pytest.mark.parametrize("device,backend", NATIVE)
@pytest.mark.parametrize("kind", KINDS)
def test_noncontiguous_and_empty(device, backend, kind):
    a, index, g, scale, add, row_idx, strength, pos_mask = _kind(kind, torch.float32, B=3, T=4,
                                                                 device=device)
    at = a.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not at.is_contiguous()
    ref = sparse_edit_reference(a, index, g, scale, add, row_idx, strength, pos_mask)
    torch.testing.assert_close(sparse_edit(at, index, g, scale, add, row_idx, strength, pos_mask,
                                           backend=backend), ref)
    # non-contiguous tables and index
    sc2 = torch.stack([scale, scale], -1)[..., 0]
    idx2 = torch.stack([index, index], 1)[:, 0]
    add2 = torch.stack([add, add], -1)[..., 0]
    assert not (sc2.is_contiguous() or idx2.is_contiguous() or add2.is_contiguous())
    torch.testing.assert_close(sparse_edit(a, idx2, g, sc2, add2, row_idx, strength, pos_mask,
                                           backend=backend), ref)
    e = sparse_edit(a[:, :0], index, g, scale, add, row_idx, strength, pos_mask[:, :0],
                    backend=backend)
    assert e.shape == (3, 0, a.shape[-1])


def _bad(**changes):
    """The arguments of a valid head edit (G=4 heads of 8 channels, n=2, E=3) with ``changes``."""
    z, hidx, hd, scale, add, row_idx, strength, pos_mask = _inputs(2, 3, 4, 8, 2, torch.float32)
    kw = dict(a=z, index=hidx, group=hd, scale_table=scale, add_table=add, row_idx=row_idx,
              strength=strength, pos_mask=pos_mask)
    for k, v in changes.items():
        kw[k] = v(kw) if callable(v) else v
    return kw


# (case id, changes, error type, message must contain)
VALIDATION = [
    ("group_not_dividing", dict(group=5, add_table=None), ValueError, "group=5"),
    ("group_zero", dict(group=0), ValueError, "group=0"),
    ("a_not_3d", dict(a=lambda k: k["a"][0]), ValueError, "a must be [B, T, N]"),
    ("add_shape", dict(add_table=lambda k: k["add_table"][:, :, :7]), ValueError, "add_table must be [E, n, group] = [E, 2, 8]"),
    ("add_other_E", dict(add_table=lambda k: k["add_table"][:2]), ValueError, "same E"),
    ("scale_shape", dict(scale_table=lambda k: k["scale_table"][:, :1]), ValueError, "scale_table must be [E, n]"),
    ("too_many_ids", dict(index=torch.arange(5), scale_table=None, add_table=None), ValueError, "n=5 > G=4"),
    ("index_int32", dict(index=lambda k: k["index"].int()), TypeError, "index must be int64"),
    ("pos_mask_float", dict(pos_mask=lambda k: k["pos_mask"].float()), ValueError, "pos_mask"),
    ("pos_mask_shape", dict(pos_mask=lambda k: k["pos_mask"][:, :2]), ValueError, "pos_mask"),
    ("row_idx_int32", dict(row_idx=lambda k: k["row_idx"].int()), ValueError, "row_idx"),
    ("a_int", dict(a=lambda k: k["a"].int()), TypeError, "fp32"),
    ("table_int", dict(scale_table=lambda k: k["scale_table"].int()), TypeError, "scale_table must be a float"),
    # the CPU kernel checks the ranges before writing anything
    ("row_idx_range", dict(row_idx=torch.tensor([3, 0]), backend="cpu"), IndexError, "row_idx[0] is outside [0, E=3)"),
    ("index_range", dict(index=torch.tensor([4, 0]), backend="cpu"), IndexError, "index[0] is outside [0, G=4)"),
]


@pytest.mark.parametrize("changes,exc,msg", [v[1:] for v in VALIDATION], ids=[v[0] for v in VALIDATION])
def test_validation_messages(changes, exc, msg):
    with pytest.raises(exc) as info:
        sparse_edit(**_bad(**changes))
    assert msg in str(info.value)


def test_neuron_add_table_may_be_flat_only_for_group_1():
    z, hidx, hd, scale, add, row_idx, strength, pos_mask = _inputs(2, 3, 4, 8, 2, torch.float32)
    with pytest.raises(ValueError, match=r"add_table must be \[E, n, group\]"):
        sparse_edit(z, hidx, hd, scale, add.reshape(3, -1), row_idx, strength, pos_mask)
    with pytest.raises(ValueError, match=r"\(or \[E, n\]\)"):
        sparse_edit(z, hidx, 1, scale, add[:, :, 0][:, :1], row_idx, strength, pos_mask)


@pytest.mark.parametrize("device,backend", [c for c in NATIVE if c.values[1] != "cpu"])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_ids_are_loud_not_out_of_bounds(device, backend, kind):
    """No host sync in Triton/CUDA: a bad row id gives NaN, a bad group id is skipped."""
    a, index, g, scale, add, row_idx, strength, pos_mask = _kind(kind, torch.float32, device=device)
    pos_mask[:] = True
    sel = (index[:, None] * g + torch.arange(g, device=device)).reshape(-1)
    out = sparse_edit(a, index, g, scale, add, torch.tensor([0, 7], device=device), strength,
                      pos_mask, backend=backend)
    assert torch.isnan(out[1][:, sel]).all() and not torch.isnan(out[0]).any()
    bad = index.clone()
    bad[1] = 1 << 40
    out = sparse_edit(a, bad, g, scale, add, row_idx, strength, pos_mask, backend=backend)
    kept = sel.reshape(-1, g)[1]
    assert torch.equal(out[..., kept], a[..., kept])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["both", "scale", "add"])
def test_gradcheck_fp64(kind, mode):
    G, g, n = {"neurons": (6, 1, 3), "heads": (3, 5, 2)}[kind]
    a, index, g, scale, add, row_idx, strength, pos_mask = _inputs(2, 3, G, g, n, torch.float64, mode)
    leaves = [a.requires_grad_(), strength.double().requires_grad_()]
    tables = [t.double().requires_grad_() if t is not None else None for t in (scale, add)]

    def split(tabs):
        it = iter(tabs)
        return (next(it) if tables[0] is not None else None,
                next(it) if tables[1] is not None else None)

    def f(a, strength, *tabs):
        return sparse_edit(a, index, g, *split(tabs), row_idx, strength, pos_mask)

    def f_op(a, strength, *tabs):  # the custom op's registered autograd
        return torch.ops.emokernels.sparse_edit(a, index, g, *split(tabs), row_idx, strength,
                                                pos_mask, "")

    inputs = (*leaves, *[t for t in tables if t is not None])
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradcheck(f_op, inputs)


@pytest.mark.parametrize("device,backend", NATIVE)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_native_matches_autograd_of_reference(device, backend, kind, dtype):
    a, index, g, scale, add, row_idx, strength, pos_mask = _kind(kind, dtype, E=2, device=device)
    grad = torch.randn(a.shape).to(dtype).to(device)
    grads = []
    for fn in (lambda *x: sparse_edit(*x, backend=backend), sparse_edit_reference):
        lv = [t.clone().requires_grad_() for t in (a, scale, add, strength)]
        fn(lv[0], index, g, lv[1], lv[2], row_idx, lv[3], pos_mask).backward(grad)
        grads.append([t.grad for t in lv])
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, **_tol(dtype))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", [None, "reference", "cpu"])
def test_torch_compile_fullgraph(kind, backend):
    # auto/reference trace the pure-torch reference (inductor fuses it); a named native backend stays one custom op
    a, index, g, scale, add, row_idx, strength, pos_mask = _kind(kind, torch.float32)

    def f(a, scale, add, strength):
        y = sparse_edit(a * 1.5, index, g, scale, add, row_idx, strength, pos_mask, backend=backend)
        return (y * y).sum()

    ops = compile_matches_eager(f, [a, scale, add, strength])
    assert uses_custom_op(ops) == (backend == "cpu")
    with torch.no_grad():  # inference graph, optional table absent
        cf = torch.compile(lambda a: sparse_edit(a, index, g, None, add, row_idx, strength, pos_mask,
                                                 backend=backend), fullgraph=True)
        torch.testing.assert_close(cf(a), sparse_edit_reference(a, index, g, None, add, row_idx,
                                                                strength, pos_mask))


# -- CUDA only -------------------------------------------------------------------------------
@gpu
def test_auto_backend_is_cuda():
    backends._reset_for_tests()
    assert backends.resolve_backend(torch.device("cuda"), "auto") == "cuda", backends.cuda_ext_error()


@gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_and_cuda_agree(kind):
    args = _kind(kind, torch.bfloat16, B=2, T=5, device="cuda")
    cpu_args = tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in args)
    torch.testing.assert_close(sparse_edit(*args, backend="cuda").cpu(),
                               sparse_edit(*cpu_args, backend="cpu"), rtol=0, atol=0)


@gpu
@pytest.mark.parametrize("shape", [(4, 1, 8192, 1, 29), (4, 1, 24, 128, 12)], ids=_shape_id)
def test_cuda_graph_capture_inplace_decode(shape):
    """No host sync and no allocation on the in-place decode path: it captures in a CUDA graph
    and follows new table rows / strengths written into the captured buffers."""
    a, index, g, scale, add, row_idx, strength, pos_mask = _inputs(*shape, torch.bfloat16, E=6,
                                                                   device="cuda")
    a0 = a.clone()
    buf = a.clone()
    with torch.no_grad():
        sparse_edit(buf, index, g, scale, add, row_idx, strength, pos_mask, backend="cuda",
                    inplace=True)  # warm-up (module load, first launch)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            sparse_edit(buf, index, g, scale, add, row_idx, strength, pos_mask, backend="cuda",
                        inplace=True)
        for rows, s in (([0, 1, 2, 3], 1.0), ([5, 5, 0, 2], -0.5)):
            row_idx.copy_(torch.tensor(rows))
            strength.fill_(s)
            buf.copy_(a0)
            graph.replay()
            torch.cuda.synchronize()
            ref = sparse_edit_reference(a0, index, g, scale, add, row_idx, strength, pos_mask)
            torch.testing.assert_close(buf, ref, **_tol(torch.bfloat16))
