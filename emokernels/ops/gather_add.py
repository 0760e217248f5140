r"""gather_add: add a per-row table vector to the residual stream at selected positions.

Math (shapes spelled out)::

    h        : [B, T, d]   activations, fp32 / bf16 / fp16 (fp64: reference only), contiguous
    table    : [E, d]      small table (one vector per emotion / intervention), fp32 or h's dtype
    row_idx  : int64 [B]   which table row each batch row uses
    strength : fp32  [B]   per-row scale (alpha)
    pos_mask : bool  [B, T] True = edit this (row, token)

    r[b, t]      = sqrt(mean_i h[b, t, i]^2 + eps)   if rms_scale else 1     (fp32, on the INPUT h)
    out[b, t, :] = h[b, t, :] + pos_mask[b, t] * strength[b] * r[b, t] * table[row_idx[b], :]

accumulated in fp32 and rounded once to h's dtype. Masked-out positions are copied bit-exactly.
It serves steering ``h += alpha * rms(h) * v_e`` (``rms_scale=True``) and the compiled circuit
biases ``h += s * b_e`` (``rms_scale=False``) with a different emotion per batch row.

Gradients (fp32, analytic; ``c = pos_mask * strength``, ``v = table[row_idx]``,
``g = d loss / d out``)::

    d h        = g + [rms_scale] c <g, v> h / (d r)
    d table[e] = sum_{b: row_idx[b] = e} sum_t c r g[b, t]
    d strength = sum_t pos_mask r <g, v>

``row_idx`` values must lie in ``[0, E)``. The ``cpu`` backend checks this (an ``IndexError``,
B comparisons); ``cuda`` and ``triton`` do not (no host synchronisation on the hot path: an
out-of-range index reads out of bounds). ``reference`` raises through torch indexing.

Backends: see :mod:`emokernels.ops.backends`. ``inplace=True`` writes into ``h`` (only without
autograd; returns ``h``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._op import HAS_TRITON, KernelOp, runners
from .backends import DTYPE_CODE, FLOATS, check_devices, contiguous, f32_contiguous

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["gather_add", "gather_add_reference"]


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------
def gather_add_reference(h: Tensor, table: Tensor, row_idx: Tensor, strength: Tensor,
                         pos_mask: Tensor, rms_scale: bool = False, eps: float = 1e-12) -> Tensor:
    """Pure-torch gather_add (fp32 accumulation, fp64 if h or table is fp64); out-of-place."""
    acc = torch.float64 if torch.float64 in (h.dtype, table.dtype) else torch.float32
    hf = h.to(acc)
    v = table.to(acc)[row_idx]                                   # [B, d]
    scale = strength.to(acc)[:, None].expand(h.shape[0], h.shape[1])  # [B, T]
    if rms_scale:
        scale = scale * torch.sqrt(hf.square().mean(-1) + eps)
    out = torch.where(pos_mask[..., None], hf + scale[..., None] * v[:, None, :], hf)
    return out.to(h.dtype)


# --------------------------------------------------------------------------------------------
# Triton kernel: one program per (b, t) row, loops over d in BLOCK chunks
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _gather_add_kernel(out_ptr, h_ptr, table_ptr, row_idx_ptr, strength_ptr, mask_ptr,
                           T, D, eps, RMS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        b = row // T
        edit = tl.load(mask_ptr + row) != 0
        s = tl.load(strength_ptr + b).to(tl.float32)
        hrow = h_ptr + row * D
        if RMS:
            ss = tl.zeros([BLOCK], dtype=tl.float32)
            for off in range(0, D, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                x = tl.load(hrow + cols, mask=cols < D, other=0.0).to(tl.float32)
                ss += x * x
            s = s * tl.sqrt(tl.sum(ss, axis=0) / D + eps)
        vrow = table_ptr + tl.load(row_idx_ptr + b) * D
        orow = out_ptr + row * D
        for off in range(0, D, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            cm = cols < D
            x = tl.load(hrow + cols, mask=cm, other=0.0).to(tl.float32)
            v = tl.load(vrow + cols, mask=cm & edit, other=0.0).to(tl.float32)
            y = tl.where(edit, x + s * v, x)
            tl.store(orow + cols, y.to(out_ptr.dtype.element_ty), mask=cm)


def _run_triton(h, table, row_idx, strength, pos_mask, rms_scale, eps, out):
    B, T, d = h.shape
    block = min(triton.next_power_of_2(d), 4096)
    _gather_add_kernel[(B * T,)](out, h, table, row_idx, strength, pos_mask, T, d, float(eps),
                                 RMS=bool(rms_scale), BLOCK=block,
                                 num_warps=4 if block <= 1024 else 8)


def _native_args(h, table, row_idx, strength, pos_mask, rms_scale, eps, out):
    B, T, d = h.shape
    return (out.data_ptr(), h.data_ptr(), table.data_ptr(), row_idx.data_ptr(), strength.data_ptr(),
            pos_mask.data_ptr(), B, T, d, table.shape[0], DTYPE_CODE[h.dtype], DTYPE_CODE[table.dtype],
            bool(rms_scale), float(eps))


def _run_reference(h, table, row_idx, strength, pos_mask, rms_scale, eps, out):
    out.copy_(gather_add_reference(h, table, row_idx, strength, pos_mask, rms_scale, eps))


_RUNNERS = runners("gather_add", _run_reference, HAS_TRITON and _run_triton, _native_args)


def _forward(backend: str, h, table, row_idx, strength, pos_mask, rms_scale, eps, out=None):
    """Run one backend; ``out`` (contiguous, h's shape and dtype) may be given, e.g. ``h`` itself."""
    if torch.float64 in (h.dtype, table.dtype) or backend == "reference":
        res = gather_add_reference(h, table, row_idx, strength, pos_mask, rms_scale, eps)
        return res if out is None else out.copy_(res)
    h, table, row_idx, pos_mask = contiguous(h), contiguous(table), contiguous(row_idx), contiguous(pos_mask)
    strength = f32_contiguous(strength)
    if out is None:
        out = torch.empty_like(h, memory_format=torch.contiguous_format)
    if h.numel() > 0:
        _RUNNERS[backend](h, table, row_idx, strength, pos_mask, rms_scale, eps, out)
    return out


# --------------------------------------------------------------------------------------------
# backward (analytic, torch)
# --------------------------------------------------------------------------------------------
def _backward(args, grads, needs, op):
    h, table, row_idx, strength, pos_mask, rms_scale, eps = args
    grad = grads[0]
    need_h, need_table, need_strength = needs[0], needs[1], needs[3]
    acc = torch.float64 if torch.float64 in (h.dtype, table.dtype, grad.dtype) else torch.float32
    g = grad.to(acc)
    d = h.shape[-1]
    m = pos_mask.to(acc)                                          # [B, T]
    s = strength.to(acc)[:, None]                                 # [B, 1]
    v = table.to(acc)[row_idx]                                    # [B, d]
    hf = h.to(acc) if rms_scale else None
    r = torch.sqrt(hf.square().mean(-1) + eps) if rms_scale else None  # [B, T]
    gv = (g * v[:, None, :]).sum(-1) if (rms_scale and need_h) or need_strength else None
    grad_h = grad_table = grad_strength = None
    if need_h:
        if rms_scale:
            grad_h = (g + (m * s * gv / (d * r))[..., None] * hf).to(h.dtype)
        else:
            grad_h = grad.to(h.dtype)
    if need_table:
        w = m * s if r is None else m * s * r                      # [B, T]
        rows = (w[..., None] * g).sum(1)                          # [B, d]
        grad_table = torch.zeros(table.shape, dtype=acc, device=table.device)
        grad_table = grad_table.index_add_(0, row_idx, rows).to(table.dtype)
    if need_strength:
        w = m if r is None else m * r
        grad_strength = (w * gv).sum(1).to(strength.dtype)
    return grad_h, grad_table, None, grad_strength, None, None, None


_OP = KernelOp(
    "gather_add",
    "(Tensor h, Tensor table, Tensor row_idx, Tensor strength, Tensor pos_mask, bool rms_scale, "
    "float eps, str backend) -> Tensor",
    reference=gather_add_reference, forward=_forward, backward=_backward, grad_args=(0, 1, 3))


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------
def _check(h, table, row_idx, strength, pos_mask):
    if h.dim() != 3:
        raise ValueError(f"gather_add: h must be [B, T, d], got shape {tuple(h.shape)}")
    B, T, d = h.shape
    if table.dim() != 2 or table.shape[1] != d:
        raise ValueError(f"gather_add: table must be [E, d] with d = h.shape[-1]; table has shape "
                         f"{tuple(table.shape)}, h has shape {tuple(h.shape)}")
    if row_idx.shape != (B,):
        raise ValueError(f"gather_add: row_idx must be [B]; row_idx has shape {tuple(row_idx.shape)}, "
                         f"h has shape {tuple(h.shape)}")
    if strength.shape != (B,):
        raise ValueError(f"gather_add: strength must be [B]; strength has shape "
                         f"{tuple(strength.shape)}, h has shape {tuple(h.shape)}")
    if pos_mask.shape != (B, T):
        raise ValueError(f"gather_add: pos_mask must be [B, T]; pos_mask has shape "
                         f"{tuple(pos_mask.shape)}, h has shape {tuple(h.shape)}")
    if h.dtype not in FLOATS or table.dtype not in FLOATS:
        raise TypeError(f"gather_add: h and table must be fp32/bf16/fp16 (fp64: reference only); "
                        f"got h {h.dtype}, table {table.dtype}")
    if row_idx.dtype != torch.int64:
        raise TypeError(f"gather_add: row_idx must be int64, got {row_idx.dtype}")
    if pos_mask.dtype != torch.bool:
        raise TypeError(f"gather_add: pos_mask must be bool, got {pos_mask.dtype}")
    if not strength.is_floating_point():
        raise TypeError(f"gather_add: strength must be a float tensor (fp32), got {strength.dtype}")
    check_devices("gather_add", h.device, table=table, row_idx=row_idx, strength=strength,
                  pos_mask=pos_mask)


def gather_add(h: Tensor, table: Tensor, row_idx: Tensor, strength: Tensor, pos_mask: Tensor,
               rms_scale: bool = False, eps: float = 1e-12, backend: str | None = None,
               inplace: bool = False) -> Tensor:
    """``h + pos_mask * strength * (rms(h) if rms_scale else 1) * table[row_idx]``; see module doc.

    Args:
        h: [B, T, d] activations. table: [E, d]. row_idx: int64 [B]. strength: fp32 [B].
        pos_mask: bool [B, T].
        rms_scale: scale by the fp32 RMS of the input row, ``sqrt(mean(h^2) + eps)``.
        backend: ``None`` (``$EMOKERNELS_BACKEND`` or auto), ``"auto"``, ``"reference"``,
            ``"cpu"``, ``"triton"`` or ``"cuda"``.
        inplace: write into ``h`` and return it (not allowed when autograd records).
    Returns:
        [B, T, d] tensor in h's dtype (a new tensor unless ``inplace``).
    """
    _check(h, table, row_idx, strength, pos_mask)
    return _OP(backend, h, table, row_idx, strength, pos_mask, bool(rms_scale), float(eps),
               out=h if inplace else None)
