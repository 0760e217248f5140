r"""head_edit: multiplicative/additive edit of attention-head slices of the ``o_proj`` input.

Math (shapes spelled out)::

    z           : [B, T, H*hd]    concatenated head outputs, fp32 / bf16 / fp16 (fp64: reference)
    head_index  : int64 [n]       distinct head ids in [0, H); 0 <= n <= H
    head_dim    : int hd          channels per head (any size: 64, 128, 40, 96, ...)
    scale_table : [E, n]          per-row, per-head factor (fp32), or None (= 1)
    add_table   : [E, n, hd]      per-row, per-head additive vector (fp32), or None (= 0)
    row_idx     : int64 [B]       which table row each batch row uses, in [0, E)
    strength    : fp32  [B]       per-row scale of the additive part
    pos_mask    : bool  [B, T]    True = edit this (row, token)

    for j < n, (b, t) with pos_mask[b, t], h = head_index[j], e = row_idx[b], i < hd:
        out[b, t, h*hd + i] = z[b, t, h*hd + i] * scale_table[e, j] + strength[b] * add_table[e, j, i]
    every other element: out = z (bit-exact copy)

computed in fp32 and rounded once to z's dtype. Head zero-ablation is ``scale_table = 0``;
stage-07 enhancement adds ``s * Δz_e`` restricted to the selected head slices
(``add_table[e, j] = Δz_e[h*hd:(h+1)*hd]``, ``strength = s``) at every position.

Gradients (``g = d loss / d out`` viewed as [B, T, H, hd], ``m = pos_mask``,
``X = z[:, :, head_index]``, ``G = g[:, :, head_index]``, both [B, T, n, hd]; sums over t, i)::

    d z               = g, times scale_table[e, j] on the selected slices of the masked rows
    d scale_table[e]  = sum_{b: row_idx[b] = e} sum_{t, i} m G X
    d add_table[e]    = sum_{b: row_idx[b] = e} strength[b] sum_t m G
    d strength[b]     = sum_{t, j, i} m G add_table[row_idx[b]]

``d z`` is the forward op with the add table dropped (the same backend kernel).

Preconditions: ``head_index`` distinct and in ``[0, H)``; ``row_idx`` in ``[0, E)``. ``cpu``
checks both (``IndexError``); ``triton``/``cuda`` skip an out-of-range head and write NaN into the
selected slices of a row with an out-of-range ``row_idx`` (no host sync); ``reference`` raises
through torch indexing (negative ``row_idx`` wraps, as in torch).

Backends: see :mod:`emokernels.ops.backends`. Native backends take fp32 tables (others are
converted). ``inplace=True`` writes into ``z`` and touches only the selected slices (no autograd).
"""
from __future__ import annotations

import functools

from typing import Optional

import torch
from torch import Tensor

from .backends import (DTYPE_CODE, FLOATS, acc_dtype, contiguous, f32_contiguous, native_fn, opt_ptr, resolve_backend,
                       stream_args, trace_reference)

try:  # Triton is optional (CPU-only installs)
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only without triton
    _HAS_TRITON = False

__all__ = ["head_edit", "head_edit_reference"]


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------
def head_edit_reference(z: Tensor, head_index: Tensor, head_dim: int,
                        scale_table: Optional[Tensor], add_table: Optional[Tensor],
                        row_idx: Tensor, strength: Tensor, pos_mask: Tensor) -> Tensor:
    """Pure-torch head_edit (fp32 arithmetic, fp64 if any input is fp64); out-of-place.

    Differentiable in ``z``, ``scale_table``, ``add_table`` and ``strength`` (``index_copy``).
    """
    B, T, D = z.shape
    hd = int(head_dim)
    acc = acc_dtype(z, scale_table, add_table, strength)
    z4 = z.reshape(B, T, D // hd, hd)
    x = z4.index_select(2, head_index)                                   # [B, T, n, hd]
    y = x.to(acc)
    if scale_table is not None:
        y = y * scale_table.to(acc)[row_idx][:, None, :, None]           # [B, 1, n, 1]
    if add_table is not None:
        y = y + strength.to(acc)[:, None, None, None] * add_table.to(acc)[row_idx][:, None]
    y = torch.where(pos_mask[..., None, None], y.to(z.dtype), x)
    return z4.index_copy(2, head_index, y).reshape(B, T, D)


# --------------------------------------------------------------------------------------------
# Triton kernel: grid (row tiles, n); a [BLOCK_R rows x BLOCK_D channels] tile of one head
# --------------------------------------------------------------------------------------------
if _HAS_TRITON:

    @triton.jit
    def _head_edit_kernel(out_ptr, z_ptr, head_index_ptr, scale_ptr, add_ptr, row_idx_ptr,
                          strength_ptr, mask_ptr, R, T, H, HD, n, E,
                          HAS_SCALE: tl.constexpr, HAS_ADD: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        j = tl.program_id(1)
        h = tl.load(head_index_ptr + j)                                          # int64
        h_ok = (h >= 0) & (h < H)                     # out-of-range head: skipped
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)   # [BR]
        ds = tl.arange(0, BLOCK_D)                                               # [BD]
        rm = rows < R
        edit = (tl.load(mask_ptr + rows, mask=rm, other=0) != 0) & rm & h_ok
        b = rows // T
        e = tl.load(row_idx_ptr + b, mask=edit, other=0)                          # [BR] int64
        e_ok = (e >= 0) & (e < E)
        m2 = edit[:, None] & (ds < HD)[None, :]       # hd need not be a power of 2: masked tail
        offs = rows[:, None] * (H * HD) + h * HD + ds[None, :]
        x = tl.load(z_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        if HAS_SCALE:
            s = tl.load(scale_ptr + e * n + j, mask=edit & e_ok, other=1.0)       # [BR]
            x = x * s[:, None]
        if HAS_ADD:
            st = tl.load(strength_ptr + b, mask=edit, other=0.0)                  # [BR]
            v = tl.load(add_ptr + (e[:, None] * n + j) * HD + ds[None, :],
                        mask=m2 & e_ok[:, None], other=0.0)
            x = x + st[:, None] * v
        x = tl.where(e_ok[:, None], x, float("nan"))  # bad row id: NaN, loudly
        tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=m2)


def _run_triton(z, head_index, hd, scale, add, row_idx, strength, pos_mask, out):
    B, T, D = z.shape
    n = head_index.numel()
    R = B * T
    if out is not z:
        out.copy_(z)
    block_d = triton.next_power_of_2(hd)
    block_r = max(1, min(triton.next_power_of_2(R), max(1, 4096 // block_d), 64))
    dummy = strength
    E = (scale if scale is not None else add).shape[0]
    grid = (triton.cdiv(R, block_r), n)
    _head_edit_kernel[grid](out, z, head_index, scale if scale is not None else dummy,
                            add if add is not None else dummy, row_idx, strength, pos_mask,
                            R, T, D // hd, hd, n, E, HAS_SCALE=scale is not None,
                            HAS_ADD=add is not None, BLOCK_R=block_r, BLOCK_D=block_d,
                            num_warps=4)
    return out


# --------------------------------------------------------------------------------------------
# native backends
# --------------------------------------------------------------------------------------------
def _run_native(backend, z, head_index, hd, scale, add, row_idx, strength, pos_mask, out):
    fn = native_fn(backend, "head_edit")
    if fn is None:
        return _run_reference(z, head_index, hd, scale, add, row_idx, strength, pos_mask, out)
    B, T, D = z.shape
    E = (scale if scale is not None else add).shape[0]
    fn(out.data_ptr(), z.data_ptr(), head_index.data_ptr(), opt_ptr(scale), opt_ptr(add),
       row_idx.data_ptr(), strength.data_ptr(), pos_mask.data_ptr(), B, T, D // hd, hd,
       head_index.numel(), E, DTYPE_CODE[z.dtype], *stream_args(backend, z))
    return out


def _run_reference(z, head_index, hd, scale, add, row_idx, strength, pos_mask, out):
    res = head_edit_reference(z, head_index, hd, scale, add, row_idx, strength, pos_mask)
    if out is None:
        return res
    return out.copy_(res)


_RUNNERS = {"reference": _run_reference, "cpu": functools.partial(_run_native, "cpu"), "triton": _run_triton,
            "cuda": functools.partial(_run_native, "cuda")}


def _forward(backend: str, z, head_index, hd, scale, add, row_idx, strength, pos_mask, out=None):
    """Run one backend; ``out`` (contiguous, z's shape and dtype) may be given, e.g. ``z`` itself."""
    if backend == "reference" or torch.float64 in (z.dtype, getattr(scale, "dtype", None),
                                                    getattr(add, "dtype", None)):
        return _run_reference(z, head_index, hd, scale, add, row_idx, strength, pos_mask, out)
    z = contiguous(z)
    if out is None:
        out = torch.empty_like(z, memory_format=torch.contiguous_format)
    if (scale is None and add is None) or head_index.numel() == 0 or z.numel() == 0:
        return out if out is z else out.copy_(z)                    # identity edit
    head_index, row_idx, pos_mask = contiguous(head_index), contiguous(row_idx), contiguous(pos_mask)
    scale, add, strength = f32_contiguous(scale), f32_contiguous(add), f32_contiguous(strength)
    return _RUNNERS[backend](z, head_index, hd, scale, add, row_idx, strength, pos_mask, out)


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------
def _backward(grad, z, head_index, hd, scale, add, row_idx, strength, pos_mask, need, grad_z_fn):
    """Gradients for (z, scale_table, add_table, strength); ``need`` = their needs_input_grad."""
    need_z, need_scale, need_add, need_strength = need
    grad_z = grad_scale = grad_add = grad_strength = None
    if need_z:
        grad_z = grad_z_fn(grad) if scale is not None else grad
        grad_z = grad_z.to(z.dtype)
    if need_scale or need_add or need_strength:
        B, T, D = z.shape
        acc = acc_dtype(z, scale, add, strength, grad)
        n = head_index.numel()
        m = pos_mask.to(acc)[..., None, None]                                  # [B, T, 1, 1]
        G = grad.reshape(B, T, D // hd, hd).index_select(2, head_index).to(acc) * m  # [B,T,n,hd]
        E = (scale if scale is not None else add).shape[0]
        if need_scale and scale is not None:
            X = z.reshape(B, T, D // hd, hd).index_select(2, head_index).to(acc)
            rows = (G * X).sum((1, 3))                                         # [B, n]
            grad_scale = torch.zeros((E, n), dtype=acc, device=z.device)
            grad_scale = grad_scale.index_add_(0, row_idx, rows).to(scale.dtype)
        if (need_add or need_strength) and add is not None:
            gs = G.sum(1)                                                      # [B, n, hd]
            if need_add:
                rows = gs * strength.to(acc)[:, None, None]
                grad_add = torch.zeros((E, n, hd), dtype=acc, device=z.device)
                grad_add = grad_add.index_add_(0, row_idx, rows).to(add.dtype)
            if need_strength:
                grad_strength = (gs * add.to(acc)[row_idx]).sum((1, 2)).to(strength.dtype)
        elif need_strength:
            grad_strength = torch.zeros_like(strength)
    return grad_z, grad_scale, grad_add, grad_strength


class _HeadEditFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, head_index, hd, scale, add, row_idx, strength, pos_mask, backend):
        ctx.save_for_backward(z, head_index, scale, add, row_idx, strength, pos_mask)
        ctx.hd, ctx.backend = hd, backend
        return _forward(backend, z, head_index, hd, scale, add, row_idx, strength, pos_mask)

    @staticmethod
    def backward(ctx, grad):
        z, head_index, scale, add, row_idx, strength, pos_mask = ctx.saved_tensors
        nig = ctx.needs_input_grad
        be, hd = ctx.backend, ctx.hd

        def grad_z_fn(g):
            return _forward(be, g, head_index, hd, scale, None, row_idx, strength, pos_mask)

        gz, gsc, gad, gst = _backward(grad, z, head_index, hd, scale, add, row_idx, strength,
                                      pos_mask, (nig[0], nig[3], nig[4], nig[6]), grad_z_fn)
        return gz, None, None, gsc, gad, None, gst, None, None


# --------------------------------------------------------------------------------------------
# custom op (torch.compile sees one opaque node)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("emokernels::head_edit", mutates_args=())
def _head_edit_op(z: Tensor, head_index: Tensor, head_dim: int, scale_table: Optional[Tensor],
                  add_table: Optional[Tensor], row_idx: Tensor, strength: Tensor,
                  pos_mask: Tensor, backend: str) -> Tensor:
    be = resolve_backend(z.device, backend or None)
    return _forward(be, z, head_index, head_dim, scale_table, add_table, row_idx, strength,
                    pos_mask)


@_head_edit_op.register_fake
def _(z, head_index, head_dim, scale_table, add_table, row_idx, strength, pos_mask, backend):
    return torch.empty(z.shape, dtype=z.dtype, device=z.device)


def _op_setup_context(ctx, inputs, output):
    z, head_index, hd, scale, add, row_idx, strength, pos_mask, backend = inputs
    ctx.save_for_backward(z, head_index, scale, add, row_idx, strength, pos_mask)
    ctx.hd, ctx.backend = hd, backend


def _op_backward(ctx, grad):
    z, head_index, scale, add, row_idx, strength, pos_mask = ctx.saved_tensors
    nig = ctx.needs_input_grad
    backend, hd = ctx.backend, ctx.hd

    def grad_z_fn(g):  # traceable: the op itself with the add table dropped
        return torch.ops.emokernels.head_edit(g, head_index, hd, scale, None, row_idx, strength,
                                              pos_mask, backend)

    gz, gsc, gad, gst = _backward(grad, z, head_index, hd, scale, add, row_idx, strength,
                                  pos_mask, (nig[0], nig[3], nig[4], nig[6]), grad_z_fn)
    return gz, None, None, gsc, gad, None, gst, None, None


_head_edit_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------
def _check(z, head_index, hd, scale, add, row_idx, strength, pos_mask):
    if z.dim() != 3:
        raise ValueError(f"head_edit: z must be [B, T, H*head_dim], got shape {tuple(z.shape)}")
    B, T, D = z.shape
    if not isinstance(hd, int) or hd <= 0 or D % hd != 0:
        raise ValueError(f"head_edit: head_dim={hd!r} must be a positive int dividing "
                         f"z.shape[-1]={D}")
    H = D // hd
    if head_index.dim() != 1 or head_index.dtype != torch.int64:
        raise TypeError(f"head_edit: head_index must be int64 [n], got {head_index.dtype} "
                        f"{tuple(head_index.shape)}")
    n = head_index.shape[0]
    if n > H:
        raise ValueError(f"head_edit: head_index has n={n} > H={H} entries (they must be distinct)")
    E = None
    if scale is not None:
        if scale.dim() != 2 or scale.shape[1] != n:
            raise ValueError(f"head_edit: scale_table must be [E, n] with n = len(head_index) = "
                             f"{n}; got {tuple(scale.shape)}")
        E = scale.shape[0]
    if add is not None:
        if add.dim() != 3 or add.shape[1:] != (n, hd) or (E is not None and add.shape[0] != E):
            raise ValueError(f"head_edit: add_table must be [E, n, head_dim] = [E, {n}, {hd}] "
                             f"(same E as scale_table); got {tuple(add.shape)}")
    for name, t in (("scale_table", scale), ("add_table", add)):
        if t is not None and t.dtype not in FLOATS:
            raise TypeError(f"head_edit: {name} must be a float tensor, got {t.dtype}")
    if row_idx.shape != (B,) or row_idx.dtype != torch.int64:
        raise ValueError(f"head_edit: row_idx must be int64 [B={B}], got {row_idx.dtype} "
                         f"{tuple(row_idx.shape)}")
    if strength.shape != (B,) or not strength.is_floating_point():
        raise ValueError(f"head_edit: strength must be float [B={B}], got {strength.dtype} "
                         f"{tuple(strength.shape)}")
    if pos_mask.shape != (B, T) or pos_mask.dtype != torch.bool:
        raise ValueError(f"head_edit: pos_mask must be bool [B={B}, T={T}], got "
                         f"{pos_mask.dtype} {tuple(pos_mask.shape)}")
    if z.dtype not in FLOATS:
        raise TypeError(f"head_edit: z must be fp32/bf16/fp16 (fp64: reference only), got {z.dtype}")
    dev = z.device
    for name, t in (("head_index", head_index), ("scale_table", scale), ("add_table", add),
                    ("row_idx", row_idx), ("strength", strength), ("pos_mask", pos_mask)):
        if t is not None and t.device != dev:
            raise ValueError(f"head_edit: all tensors must be on {dev}; {name} is on {t.device}")


def head_edit(z: Tensor, head_index: Tensor, head_dim: int, scale_table: Optional[Tensor],
              add_table: Optional[Tensor], row_idx: Tensor, strength: Tensor, pos_mask: Tensor,
              backend: str | None = None, inplace: bool = False) -> Tensor:
    """Edit the head slices ``head_index`` of ``z`` at the positions ``pos_mask``; see module doc.

    ``out[b,t,h*hd:(h+1)*hd] = z[...] * scale_table[row_idx[b], j]
    + strength[b] * add_table[row_idx[b], j, :]`` (``h = head_index[j]``) where ``pos_mask[b,t]``.

    Args:
        z: [B, T, H*head_dim] o_proj input. head_index: int64 [n] distinct head ids.
        head_dim: channels per head. scale_table: [E, n] or None (= 1).
        add_table: [E, n, head_dim] or None (= 0). row_idx: int64 [B]. strength: fp32 [B].
        pos_mask: bool [B, T].
        backend: ``None`` (``$EMOKERNELS_BACKEND`` or auto), ``"auto"``, ``"reference"``,
            ``"cpu"``, ``"triton"`` or ``"cuda"``.
        inplace: write into ``z`` and return it (not allowed when autograd records).
    Returns:
        [B, T, H*head_dim] tensor in z's dtype (a new tensor unless ``inplace``).
    """
    head_dim = int(head_dim)
    _check(z, head_index, head_dim, scale_table, add_table, row_idx, strength, pos_mask)
    if torch.compiler.is_compiling():
        if inplace:
            raise RuntimeError("head_edit: inplace=True is not supported under torch.compile")
        if trace_reference(backend):
            return head_edit_reference(z, head_index, head_dim, scale_table, add_table, row_idx, strength,
                                       pos_mask)
        return torch.ops.emokernels.head_edit(z, head_index, head_dim, scale_table, add_table,
                                              row_idx, strength, pos_mask, backend or "")
    be = resolve_backend(z.device, backend)
    if torch.is_grad_enabled() and (z.requires_grad or strength.requires_grad
                                    or (scale_table is not None and scale_table.requires_grad)
                                    or (add_table is not None and add_table.requires_grad)):
        if inplace:
            raise RuntimeError("head_edit: inplace=True needs torch.no_grad() or inputs that do "
                               "not require grad")
        return _HeadEditFn.apply(z, head_index, head_dim, scale_table, add_table, row_idx,
                                 strength, pos_mask, be)
    if inplace:
        if not z.is_contiguous():
            raise ValueError("head_edit: inplace=True needs a contiguous z")
        return _forward(be, z, head_index, head_dim, scale_table, add_table, row_idx, strength,
                        pos_mask, out=z)
    return _forward(be, z, head_index, head_dim, scale_table, add_table, row_idx, strength,
                    pos_mask)
