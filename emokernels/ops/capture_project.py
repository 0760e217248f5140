r"""capture_project: project one token row per batch row onto K directions (and optionally copy it).

Math (shapes spelled out)::

    h          : [B, T, d]   activations, fp32 / bf16 / fp16 (fp64: reference only), contiguous
    directions : [K, d]      1 <= K <= 64, any float dtype (fp32 / bf16 / fp16 natively)
    index      : int64 [B]   the position t*[b] read in each batch row, 0 <= t*[b] < T

    P[b, k]    = sum_i h[b, index[b], i] * directions[k, i]       fp32 out [B, K], fp32 accumulation
    rows[b, :] = h[b, index[b], :]                                [B, d] in h's dtype (copy_rows)

(fp64 inputs give an fp64 ``P``, for gradcheck.) It serves discovery: read the emotion projections
at the readout token without storing [B, T, d] activations.

Gradients (``g_P = d loss / d P`` [B, K], ``g_rows`` [B, d])::

    d h[b, index[b], :] = g_P[b] @ directions + g_rows[b]     (zero at every other position)
    d directions        = g_P^T @ h[b, index[b], :]

``index`` values must lie in ``[0, T)``. The ``cpu`` backend checks this (``IndexError``, B
comparisons); ``cuda`` and ``triton`` do not (no host synchronisation on the hot path).

Returns ``P`` or, with ``copy_rows=True``, ``(P, rows)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._op import HAS_TRITON, KernelOp, runners
from .backends import DTYPE_CODE, FLOATS, acc_dtype, check_devices, contiguous

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["capture_project", "capture_project_reference", "MAX_K"]

MAX_K = 64


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------
def capture_project_reference(h: Tensor, directions: Tensor, index: Tensor,
                              copy_rows: bool = False):
    """Pure-torch capture_project (fp32 accumulation; fp64 if an input is fp64)."""
    acc = acc_dtype(h, directions)
    rows = h[torch.arange(h.shape[0], device=h.device), index]    # [B, d] (a copy)
    P = rows.to(acc) @ directions.to(acc).t()                     # [B, K]
    return (P, rows) if copy_rows else P


# --------------------------------------------------------------------------------------------
# Triton kernel: one program per batch row; [BLOCK_K, BLOCK_D] tiles reduced with tl.sum
# (no tl.dot: a K x 1 product is memory-bound, and bf16 tl.dot is wrong in the interpreter)
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _capture_project_kernel(P_ptr, rows_ptr, h_ptr, dir_ptr, index_ptr, T, D, K,
                                COPY: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        t = tl.load(index_ptr + b)
        hrow = h_ptr + (b * T + t) * D
        ks = tl.arange(0, BLOCK_K).to(tl.int64)
        kmask = ks < K
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for off in range(0, D, BLOCK_D):
            cols = off + tl.arange(0, BLOCK_D)
            cm = cols < D
            x = tl.load(hrow + cols, mask=cm, other=0.0)
            if COPY:
                tl.store(rows_ptr + b * D + cols, x, mask=cm)
            v = tl.load(dir_ptr + ks[:, None] * D + cols[None, :],
                        mask=kmask[:, None] & cm[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(v * x.to(tl.float32)[None, :], axis=1)
        tl.store(P_ptr + b * K + ks, acc, mask=kmask)


def _run_triton(h, directions, index, P, rows):
    B, T, d = h.shape
    K = directions.shape[0]
    block_k = max(triton.next_power_of_2(K), 2)
    block_d = max(16, min(triton.next_power_of_2(d), 8192 // block_k, 1024))
    _capture_project_kernel[(B,)](P, rows if rows is not None else P, h, directions, index, T, d, K,
                                  COPY=rows is not None, BLOCK_K=block_k, BLOCK_D=block_d,
                                  num_warps=4)


def _native_args(h, directions, index, P, rows):
    B, T, d = h.shape
    return (P.data_ptr(), rows.data_ptr() if rows is not None else 0, h.data_ptr(),
            directions.data_ptr(), index.data_ptr(), B, T, d, directions.shape[0],
            DTYPE_CODE[h.dtype], DTYPE_CODE[directions.dtype])


def _run_reference(h, directions, index, P, rows):
    res = capture_project_reference(h, directions, index, copy_rows=True)
    P.copy_(res[0])
    if rows is not None:
        rows.copy_(res[1])


_RUNNERS = runners("capture_project", _run_reference, HAS_TRITON and _run_triton, _native_args)


def _forward(backend: str, h, directions, index, copy_rows: bool, P=None, rows=None, out=None):
    """Run one backend. Returns (P, rows) with rows None unless copy_rows.

    ``P`` / ``rows`` may be given (preallocated, contiguous, right shape and dtype).
    """
    if backend == "reference" or torch.float64 in (h.dtype, directions.dtype):
        Pr, rr = capture_project_reference(h, directions, index, copy_rows=True)
        if P is not None:
            Pr = P.copy_(Pr)
        if copy_rows and rows is not None:
            rr = rows.copy_(rr)
        return Pr, (rr if copy_rows else None)
    h, directions, index = contiguous(h), contiguous(directions), contiguous(index)
    B, T, d = h.shape
    if P is None:
        P = torch.empty((B, directions.shape[0]), dtype=torch.float32, device=h.device)
    if copy_rows and rows is None:
        rows = torch.empty((B, d), dtype=h.dtype, device=h.device)
    if B > 0:
        if d == 0:
            P.zero_()
        else:
            _RUNNERS[backend](h, directions, index, P, rows if copy_rows else None)
    return P, (rows if copy_rows else None)


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------
def _backward(grad_P, grad_rows, h, directions, index, need_h, need_dir):
    acc = acc_dtype(h, directions)
    B = h.shape[0]
    ar = torch.arange(B, device=h.device)
    grad_h = grad_dir = None
    if need_h:
        gsel = torch.zeros((B, h.shape[-1]), dtype=acc, device=h.device)
        if grad_P is not None:
            gsel = gsel + grad_P.to(acc) @ directions.to(acc)
        if grad_rows is not None and grad_rows.numel() > 0:
            gsel = gsel + grad_rows.to(acc)
        grad_h = torch.zeros(h.shape, dtype=h.dtype, device=h.device)
        grad_h[ar, index] = gsel.to(h.dtype)   # one position per batch row: no collisions
    if need_dir:
        if grad_P is None:
            grad_dir = torch.zeros_like(directions)
        else:
            grad_dir = (grad_P.to(acc).t() @ h[ar, index].to(acc)).to(directions.dtype)
    return grad_h, grad_dir


def _compiled_reference(h, directions, index, copy_rows):
    if copy_rows:
        return capture_project_reference(h, directions, index, True)
    return capture_project_reference(h, directions, index), None


_OP = KernelOp(
    "capture_project",
    "(Tensor h, Tensor directions, Tensor index, bool copy_rows, str backend) -> (Tensor, Tensor)",
    reference=capture_project_reference, compiled_reference=_compiled_reference, forward=_forward,
    backward=lambda args, grads, needs, op: (*_backward(*grads, *args[:3], needs[0], needs[1]), None, None),
    grad_args=(0, 1))


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------
def _check(h, directions, index):
    if h.dim() != 3:
        raise ValueError(f"capture_project: h must be [B, T, d], got shape {tuple(h.shape)}")
    B, T, d = h.shape
    if directions.dim() != 2 or directions.shape[1] != d:
        raise ValueError(f"capture_project: directions must be [K, d] with d = h.shape[-1]; "
                         f"directions has shape {tuple(directions.shape)}, h has shape "
                         f"{tuple(h.shape)}")
    K = directions.shape[0]
    if not 1 <= K <= MAX_K:
        raise ValueError(f"capture_project: need 1 <= K <= {MAX_K} directions, got K={K} "
                         f"(directions shape {tuple(directions.shape)})")
    if index.shape != (B,):
        raise ValueError(f"capture_project: index must be [B]; index has shape "
                         f"{tuple(index.shape)}, h has shape {tuple(h.shape)}")
    if h.dtype not in FLOATS or directions.dtype not in FLOATS:
        raise TypeError(f"capture_project: h and directions must be fp32/bf16/fp16 (fp64: "
                        f"reference only); got h {h.dtype}, directions {directions.dtype}")
    if index.dtype != torch.int64:
        raise TypeError(f"capture_project: index must be int64, got {index.dtype}")
    check_devices("capture_project", h.device, directions=directions, index=index)


def capture_project(h: Tensor, directions: Tensor, index: Tensor, copy_rows: bool = False,
                    backend: str | None = None):
    """``P[b, k] = <h[b, index[b]], directions[k]>`` (fp32 [B, K]); see module doc.

    Args:
        h: [B, T, d]. directions: [K, d], 1 <= K <= 64. index: int64 [B] in [0, T).
        copy_rows: also return ``rows = h[b, index[b]]`` ([B, d], h's dtype).
        backend: ``None`` (``$EMOKERNELS_BACKEND`` or auto), ``"auto"``, ``"reference"``,
            ``"cpu"``, ``"triton"`` or ``"cuda"``.
    Returns:
        ``P`` or ``(P, rows)``.
    """
    _check(h, directions, index)
    P, rows = _OP(backend, h, directions, index, bool(copy_rows))
    return (P, rows) if copy_rows else P
