r"""neuron_edit: sparse multiplicative/additive edit of MLP neuron activations (``down_proj`` input).

Math (shapes spelled out)::

    a           : [B, T, N]  post-SwiGLU activations, fp32 / bf16 / fp16 (fp64: reference only)
    index       : int64 [n]  distinct channel (neuron) ids in [0, N); 0 <= n <= N
    scale_table : [E, n]     per-row multiplicative factors (fp32), or None (= 1)
    add_table   : [E, n]     per-row additive values (fp32), or None (= 0)
    row_idx     : int64 [B]  which table row each batch row uses, in [0, E)
    strength    : fp32  [B]  per-row scale of the additive part
    pos_mask    : bool  [B, T] True = edit this (row, token)

    for j < n, (b, t) with pos_mask[b, t], c = index[j], e = row_idx[b]:
        out[b, t, c] = a[b, t, c] * scale_table[e, j] + strength[b] * add_table[e, j]
    every other element: out = a (bit-exact copy)

computed in fp32 and rounded once to a's dtype. Zero-ablation of the top-k neurons is
``scale_table = 0`` (no add table); enhancement with the stage-05 mean differences is
``add_table[e] = Δa_e[index]`` with ``strength = s`` (no scale table); both at once is a
"replace" edit. Different emotions per batch row go through ``row_idx``.

Gradients (fp32 or fp64 accumulation; ``g = d loss / d out``, ``m = pos_mask``,
``x = a[..., index]``, ``G = g[..., index]``, sums over t)::

    d a[b, t, c]      = g[b, t, c] * (scale_table[e, j] if m[b, t] and c = index[j] else 1)
    d scale_table[e]  = sum_{b: row_idx[b] = e} sum_t m G x
    d add_table[e]    = sum_{b: row_idx[b] = e} strength[b] sum_t m G
    d strength[b]     = sum_t m <G[b, t], add_table[row_idx[b]]>

``d a`` is the forward op itself with the add table dropped, so it runs on the same backend
kernel. The others are small torch reductions over the n selected channels.

Preconditions: ``index`` values distinct and in ``[0, N)``; ``row_idx`` in ``[0, E)``. The
``cpu`` backend checks both (``IndexError``, B + n comparisons, before writing). ``triton`` and
``cuda`` cannot check without a host sync: there an out-of-range ``index[j]`` is skipped (never
written out of bounds) and an out-of-range ``row_idx[b]`` writes NaN into the selected channels
of that row. ``reference`` raises through torch indexing (a negative ``row_idx`` wraps, as in
torch). Duplicate ``index`` entries give an unspecified result on every backend.

Backends: see :mod:`emokernels.ops.backends`. Native backends take fp32 tables (other float
tables are converted, a no-op for fp32). ``inplace=True`` writes into ``a`` and touches only the
``B*T*n`` selected elements (only without autograd; returns ``a``): the decode fast path.
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

__all__ = ["neuron_edit", "neuron_edit_reference"]


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------
def neuron_edit_reference(a: Tensor, index: Tensor, scale_table: Optional[Tensor],
                          add_table: Optional[Tensor], row_idx: Tensor, strength: Tensor,
                          pos_mask: Tensor) -> Tensor:
    """Pure-torch neuron_edit (fp32 arithmetic, fp64 if any input is fp64); out-of-place.

    Differentiable in ``a``, ``scale_table``, ``add_table`` and ``strength`` through torch
    autograd (``index_copy``).
    """
    acc = acc_dtype(a, scale_table, add_table, strength)
    x = a.index_select(-1, index)                                     # [B, T, n]
    y = x.to(acc)
    if scale_table is not None:
        y = y * scale_table.to(acc)[row_idx][:, None, :]              # [B, 1, n]
    if add_table is not None:
        y = y + strength.to(acc)[:, None, None] * add_table.to(acc)[row_idx][:, None, :]
    y = torch.where(pos_mask[..., None], y.to(a.dtype), x)
    return a.index_copy(-1, index, y)


# --------------------------------------------------------------------------------------------
# Triton kernel: a [BLOCK_R rows x BLOCK_N selected channels] tile per program
# --------------------------------------------------------------------------------------------
if _HAS_TRITON:

    @triton.jit
    def _neuron_edit_kernel(out_ptr, a_ptr, index_ptr, scale_ptr, add_ptr, row_idx_ptr,
                            strength_ptr, mask_ptr, R, T, N, n, E,
                            HAS_SCALE: tl.constexpr, HAS_ADD: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)   # [BR]
        js = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)                  # [BN]
        rm = rows < R
        edit = (tl.load(mask_ptr + rows, mask=rm, other=0) != 0) & rm
        b = rows // T
        e = tl.load(row_idx_ptr + b, mask=edit, other=0)                          # [BR] int64
        e_ok = (e >= 0) & (e < E)
        c = tl.load(index_ptr + js, mask=js < n, other=-1)                        # [BN] int64
        jm = (c >= 0) & (c < N)                       # out-of-range / padding lanes: skipped
        m2 = edit[:, None] & jm[None, :]
        t2 = m2 & e_ok[:, None]
        offs = rows[:, None] * N + c[None, :]
        x = tl.load(a_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        toff = e[:, None] * n + js[None, :]
        if HAS_SCALE:
            x = x * tl.load(scale_ptr + toff, mask=t2, other=1.0)
        if HAS_ADD:
            s = tl.load(strength_ptr + b, mask=edit, other=0.0)
            x = x + s[:, None] * tl.load(add_ptr + toff, mask=t2, other=0.0)
        x = tl.where(e_ok[:, None], x, float("nan"))  # bad row id: NaN, loudly
        tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=m2)


def _run_triton(a, index, scale, add, row_idx, strength, pos_mask, out):
    B, T, N = a.shape
    n = index.numel()
    R = B * T
    if out is not a:
        out.copy_(a)
    block_n = min(triton.next_power_of_2(n), 64)
    block_r = max(1, min(triton.next_power_of_2(R), 4096 // block_n, 256))
    dummy = strength
    grid = (triton.cdiv(R, block_r), triton.cdiv(n, block_n))
    E = (scale if scale is not None else add).shape[0]
    _neuron_edit_kernel[grid](out, a, index, scale if scale is not None else dummy,
                              add if add is not None else dummy, row_idx, strength, pos_mask,
                              R, T, N, n, E, HAS_SCALE=scale is not None,
                              HAS_ADD=add is not None, BLOCK_R=block_r, BLOCK_N=block_n,
                              num_warps=4)
    return out


# --------------------------------------------------------------------------------------------
# native backends
# --------------------------------------------------------------------------------------------
def _run_native(backend, a, index, scale, add, row_idx, strength, pos_mask, out):
    fn = native_fn(backend, "neuron_edit")
    if fn is None:
        return _run_reference(a, index, scale, add, row_idx, strength, pos_mask, out)
    B, T, N = a.shape
    E = (scale if scale is not None else add).shape[0]
    fn(out.data_ptr(), a.data_ptr(), index.data_ptr(), opt_ptr(scale), opt_ptr(add), row_idx.data_ptr(),
       strength.data_ptr(), pos_mask.data_ptr(), B, T, N, index.numel(), E, DTYPE_CODE[a.dtype],
       *stream_args(backend, a))
    return out


def _run_reference(a, index, scale, add, row_idx, strength, pos_mask, out):
    res = neuron_edit_reference(a, index, scale, add, row_idx, strength, pos_mask)
    if out is None:
        return res
    return out.copy_(res)


_RUNNERS = {"reference": _run_reference, "cpu": functools.partial(_run_native, "cpu"), "triton": _run_triton,
            "cuda": functools.partial(_run_native, "cuda")}


def _forward(backend: str, a, index, scale, add, row_idx, strength, pos_mask, out=None):
    """Run one backend; ``out`` (contiguous, a's shape and dtype) may be given, e.g. ``a`` itself."""
    if backend == "reference" or torch.float64 in (a.dtype, getattr(scale, "dtype", None),
                                                    getattr(add, "dtype", None)):
        return _run_reference(a, index, scale, add, row_idx, strength, pos_mask, out)
    a = contiguous(a)
    if out is None:
        out = torch.empty_like(a, memory_format=torch.contiguous_format)
    if (scale is None and add is None) or index.numel() == 0 or a.numel() == 0:
        return out if out is a else out.copy_(a)                   # identity edit
    index, row_idx, pos_mask = contiguous(index), contiguous(row_idx), contiguous(pos_mask)
    scale, add, strength = f32_contiguous(scale), f32_contiguous(add), f32_contiguous(strength)
    return _RUNNERS[backend](a, index, scale, add, row_idx, strength, pos_mask, out)


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------
def _backward(grad, a, index, scale, add, row_idx, strength, pos_mask, need, grad_a_fn):
    """Gradients for (a, scale_table, add_table, strength); ``need`` = their needs_input_grad.

    ``grad_a_fn(grad)`` applies the scale-only edit to ``grad`` (a backend kernel or the op).
    """
    need_a, need_scale, need_add, need_strength = need
    grad_a = grad_scale = grad_add = grad_strength = None
    if need_a:
        grad_a = grad_a_fn(grad) if scale is not None else grad
        grad_a = grad_a.to(a.dtype)
    if need_scale or need_add or need_strength:
        acc = acc_dtype(a, scale, add, strength, grad)
        m = pos_mask.to(acc)[..., None]                              # [B, T, 1]
        G = grad.index_select(-1, index).to(acc) * m                 # [B, T, n]
        E = (scale if scale is not None else add).shape[0]
        if need_scale and scale is not None:
            x = a.index_select(-1, index).to(acc)
            rows = (G * x).sum(1)                                    # [B, n]
            grad_scale = torch.zeros((E, index.numel()), dtype=acc, device=a.device)
            grad_scale = grad_scale.index_add_(0, row_idx, rows).to(scale.dtype)
        if (need_add or need_strength) and add is not None:
            gs = G.sum(1)                                            # [B, n]
            if need_add:
                rows = gs * strength.to(acc)[:, None]
                grad_add = torch.zeros((E, index.numel()), dtype=acc, device=a.device)
                grad_add = grad_add.index_add_(0, row_idx, rows).to(add.dtype)
            if need_strength:
                grad_strength = (gs * add.to(acc)[row_idx]).sum(-1).to(strength.dtype)
        elif need_strength:
            grad_strength = torch.zeros_like(strength)
    return grad_a, grad_scale, grad_add, grad_strength


class _NeuronEditFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, index, scale, add, row_idx, strength, pos_mask, backend):
        ctx.save_for_backward(a, index, scale, add, row_idx, strength, pos_mask)
        ctx.backend = backend
        return _forward(backend, a, index, scale, add, row_idx, strength, pos_mask)

    @staticmethod
    def backward(ctx, grad):
        a, index, scale, add, row_idx, strength, pos_mask = ctx.saved_tensors
        n = ctx.needs_input_grad
        be = ctx.backend

        def grad_a_fn(g):
            return _forward(be, g, index, scale, None, row_idx, strength, pos_mask)

        ga, gsc, gad, gst = _backward(grad, a, index, scale, add, row_idx, strength, pos_mask,
                                      (n[0], n[2], n[3], n[5]), grad_a_fn)
        return ga, None, gsc, gad, None, gst, None, None


# --------------------------------------------------------------------------------------------
# custom op (torch.compile sees one opaque node)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("emokernels::neuron_edit", mutates_args=())
def _neuron_edit_op(a: Tensor, index: Tensor, scale_table: Optional[Tensor],
                    add_table: Optional[Tensor], row_idx: Tensor, strength: Tensor,
                    pos_mask: Tensor, backend: str) -> Tensor:
    be = resolve_backend(a.device, backend or None)
    return _forward(be, a, index, scale_table, add_table, row_idx, strength, pos_mask)


@_neuron_edit_op.register_fake
def _(a, index, scale_table, add_table, row_idx, strength, pos_mask, backend):
    return torch.empty(a.shape, dtype=a.dtype, device=a.device)


def _op_setup_context(ctx, inputs, output):
    a, index, scale, add, row_idx, strength, pos_mask, backend = inputs
    ctx.save_for_backward(a, index, scale, add, row_idx, strength, pos_mask)
    ctx.backend = backend


def _op_backward(ctx, grad):
    a, index, scale, add, row_idx, strength, pos_mask = ctx.saved_tensors
    n = ctx.needs_input_grad
    backend = ctx.backend

    def grad_a_fn(g):  # traceable: the op itself with the add table dropped
        return torch.ops.emokernels.neuron_edit(g, index, scale, None, row_idx, strength,
                                                pos_mask, backend)

    ga, gsc, gad, gst = _backward(grad, a, index, scale, add, row_idx, strength, pos_mask,
                                  (n[0], n[2], n[3], n[5]), grad_a_fn)
    return ga, None, gsc, gad, None, gst, None, None


_neuron_edit_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------
def _check(a, index, scale, add, row_idx, strength, pos_mask):
    if a.dim() != 3:
        raise ValueError(f"neuron_edit: a must be [B, T, N], got shape {tuple(a.shape)}")
    B, T, N = a.shape
    if index.dim() != 1 or index.dtype != torch.int64:
        raise TypeError(f"neuron_edit: index must be int64 [n], got {index.dtype} "
                        f"{tuple(index.shape)}")
    n = index.shape[0]
    if n > N:
        raise ValueError(f"neuron_edit: index has n={n} > N={N} entries (they must be distinct)")
    E = None
    for name, t in (("scale_table", scale), ("add_table", add)):
        if t is None:
            continue
        if t.dim() != 2 or t.shape[1] != n or (E is not None and t.shape[0] != E):
            raise ValueError(f"neuron_edit: {name} must be [E, n] with n = len(index) = {n} "
                             f"(and the same E for both tables); got {tuple(t.shape)}")
        E = t.shape[0]
        if t.dtype not in FLOATS:
            raise TypeError(f"neuron_edit: {name} must be a float tensor, got {t.dtype}")
    if row_idx.shape != (B,) or row_idx.dtype != torch.int64:
        raise ValueError(f"neuron_edit: row_idx must be int64 [B={B}], got {row_idx.dtype} "
                         f"{tuple(row_idx.shape)}")
    if strength.shape != (B,) or not strength.is_floating_point():
        raise ValueError(f"neuron_edit: strength must be float [B={B}], got {strength.dtype} "
                         f"{tuple(strength.shape)}")
    if pos_mask.shape != (B, T) or pos_mask.dtype != torch.bool:
        raise ValueError(f"neuron_edit: pos_mask must be bool [B={B}, T={T}], got "
                         f"{pos_mask.dtype} {tuple(pos_mask.shape)}")
    if a.dtype not in FLOATS:
        raise TypeError(f"neuron_edit: a must be fp32/bf16/fp16 (fp64: reference only), got {a.dtype}")
    dev = a.device
    for name, t in (("index", index), ("scale_table", scale), ("add_table", add),
                    ("row_idx", row_idx), ("strength", strength), ("pos_mask", pos_mask)):
        if t is not None and t.device != dev:
            raise ValueError(f"neuron_edit: all tensors must be on {dev}; {name} is on {t.device}")


def neuron_edit(a: Tensor, index: Tensor, scale_table: Optional[Tensor],
                add_table: Optional[Tensor], row_idx: Tensor, strength: Tensor, pos_mask: Tensor,
                backend: str | None = None, inplace: bool = False) -> Tensor:
    """Edit the neurons ``index`` of ``a`` at the positions ``pos_mask``; see the module doc.

    ``out[b,t,index[j]] = a[b,t,index[j]] * scale_table[row_idx[b], j]
    + strength[b] * add_table[row_idx[b], j]`` where ``pos_mask[b,t]``; elsewhere ``out = a``.

    Args:
        a: [B, T, N] activations. index: int64 [n] distinct channel ids.
        scale_table: [E, n] or None (= 1). add_table: [E, n] or None (= 0).
        row_idx: int64 [B]. strength: fp32 [B]. pos_mask: bool [B, T].
        backend: ``None`` (``$EMOKERNELS_BACKEND`` or auto), ``"auto"``, ``"reference"``,
            ``"cpu"``, ``"triton"`` or ``"cuda"``.
        inplace: write into ``a`` and return it (not allowed when autograd records).
    Returns:
        [B, T, N] tensor in a's dtype (a new tensor unless ``inplace``).
    """
    _check(a, index, scale_table, add_table, row_idx, strength, pos_mask)
    if torch.compiler.is_compiling():
        if inplace:
            raise RuntimeError("neuron_edit: inplace=True is not supported under torch.compile")
        if trace_reference(backend):
            return neuron_edit_reference(a, index, scale_table, add_table, row_idx, strength, pos_mask)
        return torch.ops.emokernels.neuron_edit(a, index, scale_table, add_table, row_idx,
                                                strength, pos_mask, backend or "")
    be = resolve_backend(a.device, backend)
    if torch.is_grad_enabled() and (a.requires_grad or strength.requires_grad
                                    or (scale_table is not None and scale_table.requires_grad)
                                    or (add_table is not None and add_table.requires_grad)):
        if inplace:
            raise RuntimeError("neuron_edit: inplace=True needs torch.no_grad() or inputs that do "
                               "not require grad")
        return _NeuronEditFn.apply(a, index, scale_table, add_table, row_idx, strength, pos_mask,
                                   be)
    if inplace:
        if not a.is_contiguous():
            raise ValueError("neuron_edit: inplace=True needs a contiguous a")
        return _forward(be, a, index, scale_table, add_table, row_idx, strength, pos_mask, out=a)
    return _forward(be, a, index, scale_table, add_table, row_idx, strength, pos_mask)
