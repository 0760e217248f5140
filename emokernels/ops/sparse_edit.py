r"""sparse_edit: multiplicative/additive edit of selected channel groups (MLP neurons, attention heads).

A group is ``group`` consecutive channels: one MLP neuron of the ``down_proj`` input
(``group = 1``) or one attention head of the ``o_proj`` input (``group = head_dim``).

Math (shapes spelled out; ``g = group``)::

    a           : [B, T, N]     activations, N = G*g, fp32 / bf16 / fp16 (fp64: reference only)
    index       : int64 [n]     distinct group ids in [0, G); 0 <= n <= G
    scale_table : [E, n]        per-row, per-group factor (fp32), or None (= 1)
    add_table   : [E, n, g]     per-row, per-group additive vector (fp32), or None (= 0);
                                [E, n] is accepted when g = 1 (neurons)
    row_idx     : int64 [B]     which table row each batch row uses, in [0, E)
    strength    : fp32  [B]     per-row scale of the additive part
    pos_mask    : bool  [B, T]  True = edit this (row, token)

    for j < n, (b, t) with pos_mask[b, t], c = index[j], e = row_idx[b], i < g:
        out[b, t, c*g + i] = a[b, t, c*g + i] * scale_table[e, j] + strength[b] * add_table[e, j, i]
    every other element: out = a (bit-exact copy)

computed in fp32 and rounded once to a's dtype. Zero-ablation of the top-k neurons or heads is
``scale_table = 0`` (no add table); enhancement with the stage-05 / stage-07 mean differences is
``add_table[e] = Δ_e`` restricted to the selected groups, with ``strength = s`` (no scale
table); both at once is a "replace" edit. Different emotions per batch row go through ``row_idx``.

Gradients (fp32 or fp64 accumulation; ``g_out = d loss / d out`` viewed as [B, T, G, g],
``m = pos_mask``, ``X = a[:, :, index]``, ``Gs = g_out[:, :, index]``, both [B, T, n, g])::

    d a               = g_out, times scale_table[e, j] on the selected groups of the masked rows
    d scale_table[e]  = sum_{b: row_idx[b] = e} sum_{t, i} m Gs X
    d add_table[e]    = sum_{b: row_idx[b] = e} strength[b] sum_t m Gs
    d strength[b]     = sum_{t, j, i} m Gs add_table[row_idx[b]]

``d a`` is the forward op itself with the add table dropped, so it runs on the same backend
kernel. The others are small torch reductions over the n selected groups.

Preconditions: ``index`` values distinct and in ``[0, G)``; ``row_idx`` in ``[0, E)``. The
``cpu`` backend checks both (``IndexError``, B + n comparisons, before writing). ``triton`` and
``cuda`` cannot check without a host sync: there an out-of-range ``index[j]`` is skipped (never
written out of bounds) and an out-of-range ``row_idx[b]`` writes NaN into the selected channels
of that row. ``reference`` raises through torch indexing (a negative ``row_idx`` wraps, as in
torch). Duplicate ``index`` entries give an unspecified result on every backend.

Backends: see :mod:`emokernels.ops.backends`. Native backends take fp32 tables (other float
tables are converted, a no-op for fp32). ``inplace=True`` writes into ``a`` and touches only the
``B*T*n*g`` selected elements (only without autograd; returns ``a``): the decode fast path.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._op import HAS_TRITON, KernelOp, runners
from .backends import DTYPE_CODE, FLOATS, acc_dtype, check_devices, contiguous, f32_contiguous, opt_ptr

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["sparse_edit", "sparse_edit_reference"]


def _add3(add_table: Optional[Tensor], n: int, group: int) -> Optional[Tensor]:
    """``add_table`` as [E, n, group] (a view; [E, n] is accepted for group 1)."""
    return None if add_table is None else add_table.reshape(add_table.shape[0], n, group)


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------
def sparse_edit_reference(a: Tensor, index: Tensor, group: int, scale_table: Optional[Tensor],
                          add_table: Optional[Tensor], row_idx: Tensor, strength: Tensor,
                          pos_mask: Tensor) -> Tensor:
    """Pure-torch sparse_edit (fp32 arithmetic, fp64 if any input is fp64); out-of-place.

    Differentiable in ``a``, ``scale_table``, ``add_table`` and ``strength`` (``index_copy``).
    """
    B, T, N = a.shape
    g = int(group)
    acc = acc_dtype(a, scale_table, add_table, strength)
    a4 = a.reshape(B, T, N // g, g)
    x = a4.index_select(2, index)                                        # [B, T, n, g]
    y = x.to(acc)
    if scale_table is not None:
        y = y * scale_table.to(acc)[row_idx][:, None, :, None]           # [B, 1, n, 1]
    if add_table is not None:
        add = _add3(add_table, index.shape[0], g)
        y = y + strength.to(acc)[:, None, None, None] * add.to(acc)[row_idx][:, None]
    y = torch.where(pos_mask[..., None, None], y.to(a.dtype), x)
    return a4.index_copy(2, index, y).reshape(B, T, N)


# --------------------------------------------------------------------------------------------
# Triton kernel: a [BLOCK_R rows x BLOCK_C selected channels] tile per program; the n*g selected
# channels of a row are numbered k = j*g + i (group j, channel i within it)
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _sparse_edit_kernel(out_ptr, a_ptr, index_ptr, scale_ptr, add_ptr, row_idx_ptr,
                            strength_ptr, mask_ptr, R, T, N, G, GS, n, E,
                            HAS_SCALE: tl.constexpr, HAS_ADD: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)   # [BR]
        ks = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)                  # [BC]
        C = n * GS
        km = ks < C
        j = ks // GS
        rm = rows < R
        edit = (tl.load(mask_ptr + rows, mask=rm, other=0) != 0) & rm
        b = rows // T
        e = tl.load(row_idx_ptr + b, mask=edit, other=0)                          # [BR] int64
        e_ok = (e >= 0) & (e < E)
        c = tl.load(index_ptr + j, mask=km, other=-1)                             # [BC] int64
        jm = km & (c >= 0) & (c < G)                  # out-of-range / padding lanes: skipped
        m2 = edit[:, None] & jm[None, :]
        t2 = m2 & e_ok[:, None]
        offs = rows[:, None] * N + (c * GS + ks - j * GS)[None, :]
        x = tl.load(a_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        if HAS_SCALE:
            x = x * tl.load(scale_ptr + e[:, None] * n + j[None, :], mask=t2, other=1.0)
        if HAS_ADD:
            s = tl.load(strength_ptr + b, mask=edit, other=0.0)
            x = x + s[:, None] * tl.load(add_ptr + e[:, None] * C + ks[None, :], mask=t2, other=0.0)
        x = tl.where(e_ok[:, None], x, float("nan"))  # bad row id: NaN, loudly
        tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=m2)


def _run_triton(a, index, g, scale, add, row_idx, strength, pos_mask, out):
    B, T, N = a.shape
    n = index.numel()
    R = B * T
    if out is not a:
        out.copy_(a)
    block_c = min(triton.next_power_of_2(n * g), 64)
    block_r = max(1, min(triton.next_power_of_2(R), 4096 // block_c, 256))
    E = (scale if scale is not None else add).shape[0]
    grid = (triton.cdiv(R, block_r), triton.cdiv(n * g, block_c))
    _sparse_edit_kernel[grid](out, a, index, scale if scale is not None else strength,
                              add if add is not None else strength, row_idx, strength, pos_mask,
                              R, T, N, N // g, g, n, E, HAS_SCALE=scale is not None,
                              HAS_ADD=add is not None, BLOCK_R=block_r, BLOCK_C=block_c,
                              num_warps=4)


def _native_args(a, index, g, scale, add, row_idx, strength, pos_mask, out):
    B, T, N = a.shape
    E = (scale if scale is not None else add).shape[0]
    return (out.data_ptr(), a.data_ptr(), index.data_ptr(), opt_ptr(scale), opt_ptr(add),
            row_idx.data_ptr(), strength.data_ptr(), pos_mask.data_ptr(), B, T, N, g,
            index.numel(), E, DTYPE_CODE[a.dtype])


def _run_reference(a, index, g, scale, add, row_idx, strength, pos_mask, out):
    out.copy_(sparse_edit_reference(a, index, g, scale, add, row_idx, strength, pos_mask))


_RUNNERS = runners("sparse_edit", _run_reference, HAS_TRITON and _run_triton, _native_args)


def _forward(backend: str, a, index, g, scale, add, row_idx, strength, pos_mask, out=None):
    """Run one backend; ``out`` (contiguous, a's shape and dtype) may be given, e.g. ``a`` itself."""
    if backend == "reference" or torch.float64 in (a.dtype, getattr(scale, "dtype", None),
                                                    getattr(add, "dtype", None)):
        res = sparse_edit_reference(a, index, g, scale, add, row_idx, strength, pos_mask)
        return res if out is None else out.copy_(res)
    a = contiguous(a)
    if out is None:
        out = torch.empty_like(a, memory_format=torch.contiguous_format)
    if (scale is None and add is None) or index.numel() == 0 or a.numel() == 0:
        return out if out is a else out.copy_(a)                   # identity edit
    index, row_idx, pos_mask = contiguous(index), contiguous(row_idx), contiguous(pos_mask)
    scale, add, strength = f32_contiguous(scale), f32_contiguous(add), f32_contiguous(strength)
    _RUNNERS[backend](a, index, g, scale, add, row_idx, strength, pos_mask, out)
    return out


# --------------------------------------------------------------------------------------------
# backward (analytic, torch; d a is the op itself without the add table)
# --------------------------------------------------------------------------------------------
def _backward(args, grads, needs, op):
    a, index, g, scale, add, row_idx, strength, pos_mask = args
    grad = grads[0]
    grad_a = grad_scale = grad_add = grad_strength = None
    if needs[0]:
        grad_a = op(grad, index, g, scale, None, row_idx, strength, pos_mask) if scale is not None else grad
        grad_a = grad_a.to(a.dtype)
    if needs[3] or needs[4] or needs[6]:
        B, T, N = a.shape
        n = index.numel()
        acc = acc_dtype(a, scale, add, strength, grad)
        m = pos_mask.to(acc)[..., None, None]                                  # [B, T, 1, 1]
        Gs = grad.reshape(B, T, N // g, g).index_select(2, index).to(acc) * m  # [B, T, n, g]
        E = (scale if scale is not None else add).shape[0]
        if needs[3] and scale is not None:
            X = a.reshape(B, T, N // g, g).index_select(2, index).to(acc)
            rows = (Gs * X).sum((1, 3))                                        # [B, n]
            grad_scale = torch.zeros((E, n), dtype=acc, device=a.device)
            grad_scale = grad_scale.index_add_(0, row_idx, rows).to(scale.dtype)
        if (needs[4] or needs[6]) and add is not None:
            gs = Gs.sum(1)                                                     # [B, n, g]
            if needs[4]:
                rows = gs * strength.to(acc)[:, None, None]
                grad_add = torch.zeros((E, n, g), dtype=acc, device=a.device)
                grad_add = grad_add.index_add_(0, row_idx, rows).to(add.dtype).reshape(add.shape)
            if needs[6]:
                add3 = _add3(add, n, g).to(acc)
                grad_strength = (gs * add3[row_idx]).sum((1, 2)).to(strength.dtype)
        elif needs[6]:
            grad_strength = torch.zeros_like(strength)
    return grad_a, None, None, grad_scale, grad_add, None, grad_strength, None


_OP = KernelOp(
    "sparse_edit",
    "(Tensor a, Tensor index, int group, Tensor? scale_table, Tensor? add_table, Tensor row_idx, "
    "Tensor strength, Tensor pos_mask, str backend) -> Tensor",
    reference=sparse_edit_reference, forward=_forward, backward=_backward, grad_args=(0, 3, 4, 6))


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------
def _check(a, index, g, scale, add, row_idx, strength, pos_mask):
    if a.dim() != 3:
        raise ValueError(f"sparse_edit: a must be [B, T, N], got shape {tuple(a.shape)}")
    B, T, N = a.shape
    if not isinstance(g, int) or g <= 0 or N % g != 0:
        raise ValueError(f"sparse_edit: group={g!r} (1 for neurons, head_dim for heads) must be a "
                         f"positive int dividing a.shape[-1]={N}")
    G = N // g
    if index.dim() != 1 or index.dtype != torch.int64:
        raise TypeError(f"sparse_edit: index must be int64 [n], got {index.dtype} "
                        f"{tuple(index.shape)}")
    n = index.shape[0]
    if n > G:
        raise ValueError(f"sparse_edit: index has n={n} > G={G} groups of {g} (ids must be distinct)")
    E = None
    if scale is not None:
        if scale.dim() != 2 or scale.shape[1] != n:
            raise ValueError(f"sparse_edit: scale_table must be [E, n] with n = len(index) = {n}; "
                             f"got {tuple(scale.shape)}")
        E = scale.shape[0]
    if add is not None:
        ok = add.shape[1:] == (n, g) or (g == 1 and add.shape[1:] == (n,))
        if not ok or (E is not None and add.shape[0] != E):
            raise ValueError(f"sparse_edit: add_table must be [E, n, group] = [E, {n}, {g}]"
                             f"{' (or [E, n])' if g == 1 else ''} (same E as scale_table); "
                             f"got {tuple(add.shape)}")
    for name, t in (("scale_table", scale), ("add_table", add)):
        if t is not None and t.dtype not in FLOATS:
            raise TypeError(f"sparse_edit: {name} must be a float tensor, got {t.dtype}")
    if row_idx.shape != (B,) or row_idx.dtype != torch.int64:
        raise ValueError(f"sparse_edit: row_idx must be int64 [B={B}], got {row_idx.dtype} "
                         f"{tuple(row_idx.shape)}")
    if strength.shape != (B,) or not strength.is_floating_point():
        raise ValueError(f"sparse_edit: strength must be float [B={B}], got {strength.dtype} "
                         f"{tuple(strength.shape)}")
    if pos_mask.shape != (B, T) or pos_mask.dtype != torch.bool:
        raise ValueError(f"sparse_edit: pos_mask must be bool [B={B}, T={T}], got "
                         f"{pos_mask.dtype} {tuple(pos_mask.shape)}")
    if a.dtype not in FLOATS:
        raise TypeError(f"sparse_edit: a must be fp32/bf16/fp16 (fp64: reference only), got {a.dtype}")
    check_devices("sparse_edit", a.device, index=index, scale_table=scale, add_table=add,
                  row_idx=row_idx, strength=strength, pos_mask=pos_mask)


def sparse_edit(a: Tensor, index: Tensor, group: int, scale_table: Optional[Tensor],
                add_table: Optional[Tensor], row_idx: Tensor, strength: Tensor, pos_mask: Tensor,
                backend: str | None = None, inplace: bool = False) -> Tensor:
    """Edit the channel groups ``index`` of ``a`` at the positions ``pos_mask``; see the module doc.

    ``out[b,t,c*g:(c+1)*g] = a[...] * scale_table[row_idx[b], j]
    + strength[b] * add_table[row_idx[b], j, :]`` (``c = index[j]``, ``g = group``) where
    ``pos_mask[b,t]``; elsewhere ``out = a``.

    Args:
        a: [B, T, N] activations (``down_proj`` input for neurons, ``o_proj`` input for heads).
        index: int64 [n] distinct group ids. group: channels per group (1: neurons; head_dim: heads).
        scale_table: [E, n] or None (= 1). add_table: [E, n, group] ([E, n] for group 1) or None
        (= 0). row_idx: int64 [B]. strength: fp32 [B]. pos_mask: bool [B, T].
        backend: ``None`` (``$EMOKERNELS_BACKEND`` or auto), ``"auto"``, ``"reference"``,
            ``"cpu"``, ``"triton"`` or ``"cuda"``.
        inplace: write into ``a`` and return it (not allowed when autograd records).
    Returns:
        [B, T, N] tensor in a's dtype (a new tensor unless ``inplace``).
    """
    group = int(group)
    _check(a, index, group, scale_table, add_table, row_idx, strength, pos_mask)
    return _OP(backend, a, index, group, scale_table, add_table, row_idx, strength, pos_mask,
               out=a if inplace else None)
