r"""fused_add_rmsnorm: residual add + per-row edit + RMSNorm (+ readout projections) in one pass.

The decoder-layer residual path (``m = h + A; n = RMSNorm(m)``, then ``h' = m + F``) with the
interventions riding inside it, as Liger-Kernel's fused add+RMSNorm does for plain layers. One
pass reads ``residual`` and ``delta`` once and writes ``m`` (and ``n``); no extra read or write of
the hidden state for the edit or the projections.

Math (shapes spelled out)::

    residual, delta : [B, T, d]   fp32 / bf16 / fp16 (fp64: reference only), same dtype
    table           : [E, d] or None   per-row edit vectors (fp32 or the activation dtype)
    row_idx         : int64 [B]   which table row each batch row uses, in [0, E)
    strength        : fp32  [B]   per-row scale
    pos_mask        : bool  [B, T] True = edit this (row, token)
    gamma           : [d] or None  RMSNorm weight (stored γ - 1 for Gemma: ``gemma=True``)
    directions      : [K, d] or None, 1 <= K <= 64;  readout : int64 [B] in [0, T)

    m0[b,t]   = residual[b,t] + delta[b,t]            rounded to the activation dtype, exactly
                                                       HF's ``residual + hidden_states``
    r[b,t]    = sqrt(mean_i m0[b,t,i]^2 + edit_eps)    if rms_scale else 1        (fp32)
    m[b,t]    = m0[b,t] + pos_mask[b,t] * strength[b] * r[b,t] * table[row_idx[b]]
                                                       (fp32, rounded once; = m0 without table)
    s[b,t]    = rsqrt(mean_i m[b,t,i]^2 + eps)         fp32, on the rounded m
    n[b,t]    = gamma * (m[b,t] * s[b,t]).to(dtype)    Llama & co (HF ``weight * x.to(dtype)``)
              = (m[b,t] * s[b,t] * (1 + gamma)).to(dtype)          Gemma (``gemma=True``)
    P[b, k]   = sum_i m[b, readout[b], i] * directions[k, i]      fp32 [B, K]

The unedited path is bit-identical to HF for ``m`` (the same elementwise add and rounding); ``n``
matches HF up to the fp32 summation order of the variance (about one ulp). With ``gamma=None``
only ``m`` is produced (the post-MLP residual add). ``n``'s dtype follows HF: the activation
dtype, or ``promote(gamma, m)`` for a Llama-style ``gamma`` of another dtype (reference only).

Gradients (fp32 or fp64 accumulation; ``g_m``, ``g_n``, ``g_P`` the incoming grads,
``c = pos_mask * strength``, ``v = table[row_idx]``, ``y = m * s``, ``γ' = gamma`` or
``1 + gamma``)::

    g_y          = g_n * γ'
    ĝ            = g_m + s (g_y - y * mean_i(g_y y)) + [t = readout[b]] g_P[b] @ directions
    d gamma      = sum_{b,t} g_n * y
    d directions = g_P^T @ m[b, readout[b]]
    d table[e]   = sum_{b: row_idx[b] = e} sum_t c r ĝ
    d strength   = sum_t pos_mask r <ĝ, v>
    d residual   = d delta = ĝ + [rms_scale] c <ĝ, v> m0 / (d r)

``row_idx`` must lie in ``[0, E)`` and ``readout`` in ``[0, T)``. The ``cpu`` backend checks both
(``IndexError``, before writing); ``cuda`` and ``triton`` do not (no host synchronisation on the hot
path). Native backends need ``residual``, ``delta`` and ``gamma`` of one dtype and ``d <= 16384``
(``cuda``); other cases run the reference. ``directions`` are read as fp32 (converted if needed).

Backends: see :mod:`emokernels.ops.backends`. Out-of-place only (``m`` and ``n`` are new tensors).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._op import HAS_TRITON, KernelOp, runners
from .backends import DTYPE_CODE, FLOATS, acc_dtype, check_devices, contiguous, f32_contiguous, warn_once
from .capture_project import capture_project_reference
from .gather_add import gather_add_reference

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["fused_add_rmsnorm", "fused_add_rmsnorm_reference", "MAX_K", "CUDA_MAX_D"]

MAX_K = 64
CUDA_MAX_D = 16384
EDIT_EPS = 1e-12


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------
def fused_add_rmsnorm_reference(residual: Tensor, delta: Tensor, table: Optional[Tensor] = None,
                                row_idx: Optional[Tensor] = None, strength: Optional[Tensor] = None,
                                pos_mask: Optional[Tensor] = None, rms_scale: bool = False,
                                gamma: Optional[Tensor] = None, eps: float = 1e-6,
                                gemma: bool = False, directions: Optional[Tensor] = None,
                                readout: Optional[Tensor] = None, edit_eps: float = EDIT_EPS):
    """Pure-torch fused_add_rmsnorm, written with HF's own ops; returns ``(m, n, P)``.

    ``n`` is None without ``gamma``, ``P`` None without ``directions``. Without an edit this is
    literally HF's ``residual + hidden_states`` followed by its RMSNorm code.
    """
    m = residual + delta
    if table is not None:
        m = gather_add_reference(m, table, row_idx, strength, pos_mask, rms_scale, edit_eps)
    n = None
    if gamma is not None:
        acc = acc_dtype(m, gamma)
        x = m.to(acc)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        if gemma:
            n = (x * (1.0 + gamma.to(acc))).to(m.dtype)
        else:
            n = gamma * x.to(m.dtype)
    P = capture_project_reference(m, directions, readout) if directions is not None else None
    return m, n, P


# --------------------------------------------------------------------------------------------
# Triton kernel: one program per (b, t) row, the whole row in one BLOCK = next_pow2(d) tile
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _fused_add_rmsnorm_kernel(m_ptr, n_ptr, P_ptr, res_ptr, delta_ptr, table_ptr,
                                  row_idx_ptr, strength_ptr, mask_ptr, gamma_ptr, dir_ptr,
                                  readout_ptr, T, D, K, eps, edit_eps,
                                  HAS_EDIT: tl.constexpr, RMS: tl.constexpr,
                                  HAS_NORM: tl.constexpr, GEMMA: tl.constexpr,
                                  HAS_PROJ: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        b = row // T
        cols = tl.arange(0, BLOCK)
        cm = cols < D
        x = tl.load(res_ptr + row * D + cols, mask=cm, other=0.0).to(tl.float32)
        y = tl.load(delta_ptr + row * D + cols, mask=cm, other=0.0).to(tl.float32)
        # HF rounds residual + delta to the activation dtype before anything reads it
        m = (x + y).to(m_ptr.dtype.element_ty).to(tl.float32)
        if HAS_EDIT:
            edit = tl.load(mask_ptr + row) != 0
            s = tl.load(strength_ptr + b).to(tl.float32)
            if RMS:
                s = s * tl.sqrt(tl.sum(m * m, axis=0) / D + edit_eps)
            e = tl.load(row_idx_ptr + b)
            v = tl.load(table_ptr + e * D + cols, mask=cm & edit, other=0.0).to(tl.float32)
            m = tl.where(edit, m + s * v, m).to(m_ptr.dtype.element_ty).to(tl.float32)
        tl.store(m_ptr + row * D + cols, m.to(m_ptr.dtype.element_ty), mask=cm)
        if HAS_NORM:
            inv = 1.0 / tl.sqrt(tl.sum(m * m, axis=0) / D + eps)
            xn = m * inv
            g = tl.load(gamma_ptr + cols, mask=cm, other=0.0).to(tl.float32)
            if GEMMA:
                n = xn * (1.0 + g)
            else:
                n = g * xn.to(m_ptr.dtype.element_ty).to(tl.float32)
            tl.store(n_ptr + row * D + cols, n.to(n_ptr.dtype.element_ty), mask=cm)
        if HAS_PROJ:
            t = row - b * T
            if tl.load(readout_ptr + b) == t:
                for k in range(0, K):
                    dk = tl.load(dir_ptr + k * D + cols, mask=cm, other=0.0).to(tl.float32)
                    tl.store(P_ptr + b * K + k, tl.sum(m * dk, axis=0))


def _run_triton(m, n, P, res, delta, table, row_idx, strength, pos_mask, rms_scale, gamma, eps,
                gemma, directions, readout, edit_eps, K):
    B, T, d = res.shape
    block = triton.next_power_of_2(d)
    _fused_add_rmsnorm_kernel[(B * T,)](
        m, n if n is not None else m, P if P is not None else res, res, delta,
        table if table is not None else res, row_idx if row_idx is not None else res,
        strength if strength is not None else res, pos_mask if pos_mask is not None else res,
        gamma if gamma is not None else res, directions if directions is not None else res,
        readout if readout is not None else res,
        T, d, K, float(eps), float(edit_eps),
        HAS_EDIT=table is not None, RMS=bool(rms_scale), HAS_NORM=gamma is not None,
        GEMMA=bool(gemma), HAS_PROJ=directions is not None, BLOCK=block,
        num_warps=4 if block <= 1024 else (8 if block <= 4096 else 16))


# --------------------------------------------------------------------------------------------
# native backends
# --------------------------------------------------------------------------------------------
def _native_args(m, n, P, res, delta, table, row_idx, strength, pos_mask, rms_scale, gamma, eps,
                 gemma, directions, readout, edit_eps, K):
    B, T, d = res.shape
    edit = table is not None
    return (m.data_ptr(), 0 if n is None else n.data_ptr(), 0 if P is None else P.data_ptr(),
            res.data_ptr(), delta.data_ptr(),
            table.data_ptr() if edit else 0, row_idx.data_ptr() if edit else 0,
            strength.data_ptr() if edit else 0, pos_mask.data_ptr() if edit else 0,
            0 if gamma is None else gamma.data_ptr(),
            0 if directions is None else directions.data_ptr(),
            0 if readout is None else readout.data_ptr(),
            B, T, d, table.shape[0] if edit else 0, K, DTYPE_CODE[res.dtype],
            edit and table.dtype == torch.float32, edit, rms_scale, gamma is not None, gemma,
            directions is not None, eps, edit_eps)


def _run_reference(m, n, P, res, delta, table, row_idx, strength, pos_mask, rms_scale, gamma,
                   eps, gemma, directions, readout, edit_eps, K):
    rm, rn, rP = fused_add_rmsnorm_reference(res, delta, table, row_idx, strength, pos_mask,
                                             rms_scale, gamma, eps, gemma, directions, readout,
                                             edit_eps)
    m.copy_(rm)
    if n is not None:
        n.copy_(rn)
    if P is not None:
        P.copy_(rP)


_RUNNERS = runners("fused_add_rmsnorm", _run_reference, HAS_TRITON and _run_triton, _native_args)
_run_cuda_kernel = _RUNNERS["cuda"]


def _run_cuda(*args):
    d = args[3].shape[-1]
    if d > CUDA_MAX_D:
        alt = "triton" if HAS_TRITON else "reference"
        warn_once(("fused_add_rmsnorm", "cuda-d"),
                  f"emokernels: the fused_add_rmsnorm cuda kernel takes d <= {CUDA_MAX_D}; "
                  f"using {alt!r} for d = {d}")
        return (_run_triton if HAS_TRITON else _run_reference)(*args)
    _run_cuda_kernel(*args)


_RUNNERS["cuda"] = _run_cuda


def _forward(backend: str, residual, delta, table, row_idx, strength, pos_mask, rms_scale, gamma,
             eps, gemma, directions, readout, edit_eps, out=None):
    """Run one backend; returns ``(m, n, P)``, None for an absent ``n`` / ``P``.

    ``out=(m, n, P)`` gives preallocated (contiguous) output buffers (None for absent parts).
    Native backends need residual, delta (and gamma) of one dtype and a table of that dtype or
    fp32; other inputs run the reference.
    """
    dt = residual.dtype
    if (backend == "reference" or dt not in DTYPE_CODE or delta.dtype != dt
            or (table is not None and table.dtype != dt and table.dtype != torch.float32)
            or (gamma is not None and gamma.dtype != dt)):
        m, n, P = fused_add_rmsnorm_reference(residual, delta, table, row_idx, strength, pos_mask,
                                              rms_scale, gamma, eps, gemma, directions, readout,
                                              edit_eps)
        if out is not None:
            m = out[0].copy_(m)
            n = out[1].copy_(n) if n is not None else None
            P = out[2].copy_(P) if P is not None else None
        return m, n, P
    residual, delta, gamma = contiguous(residual), contiguous(delta), contiguous(gamma)
    shape = residual.shape
    dev = residual.device
    if table is not None:
        table, row_idx, pos_mask = contiguous(table), contiguous(row_idx), contiguous(pos_mask)
        strength = f32_contiguous(strength)
    K = 0
    P = None
    if directions is not None:
        directions, readout = f32_contiguous(directions), contiguous(readout)
        K = directions.shape[0]
        P = torch.empty((shape[0], K), dtype=torch.float32, device=dev) if out is None else out[2]
    if out is None:
        m = torch.empty_like(residual)  # residual is contiguous here; cheaper than torch.empty
        n = torch.empty_like(residual) if gamma is not None else None
    else:
        m, n = out[0], (out[1] if gamma is not None else None)
    if residual.numel() > 0:
        _RUNNERS[backend](m, n, P, residual, delta, table, row_idx, strength, pos_mask,
                          bool(rms_scale), gamma, float(eps), bool(gemma), directions, readout,
                          float(edit_eps), K)
    elif P is not None:
        P.zero_()
    return m, n, P


# --------------------------------------------------------------------------------------------
# autograd (analytic backward in torch, fp32 / fp64)
# --------------------------------------------------------------------------------------------
def _backward(gm, gn, gP, residual, delta, table, row_idx, strength, pos_mask, rms_scale, gamma,
              eps, gemma, directions, readout, edit_eps, needs):
    """Grads for (residual, delta, table, strength, gamma, directions); ``needs`` the 6 flags."""
    acc = acc_dtype(residual, delta, table, gamma, directions,
                     gm if gm is not None and gm.numel() else None)
    m0 = (residual + delta).to(acc)
    d = m0.shape[-1]
    if table is not None:
        c = pos_mask.to(acc) * strength.to(acc)[:, None]                 # [B, T]
        v = table.to(acc)[row_idx]                                       # [B, d]
        r0 = torch.sqrt(m0.square().mean(-1) + edit_eps) if rms_scale else None
        w = c * r0 if rms_scale else c
        m = m0 + w[..., None] * v[:, None, :]
    else:
        m = m0
    g = gm.to(acc) if gm is not None and gm.numel() else torch.zeros_like(m)
    grad_gamma = grad_dir = grad_table = grad_strength = None
    if gamma is not None and gn is not None and gn.numel():
        s = torch.rsqrt(m.square().mean(-1, keepdim=True) + eps)
        y = m * s
        gn_ = gn.to(acc)
        geff = (1.0 + gamma.to(acc)) if gemma else gamma.to(acc)
        gy = gn_ * geff
        g = g + s * (gy - y * (gy * y).mean(-1, keepdim=True))
        if needs[4]:
            grad_gamma = (gn_ * y).reshape(-1, d).sum(0).to(gamma.dtype)
    if directions is not None and gP is not None and gP.numel():
        ar = torch.arange(m.shape[0], device=m.device)
        gP_ = gP.to(acc)
        g = g.index_put((ar, readout), gP_ @ directions.to(acc), accumulate=True)
        if needs[5]:
            grad_dir = (gP_.t() @ m[ar, readout]).to(directions.dtype)
    elif directions is not None and needs[5]:
        grad_dir = torch.zeros_like(directions)
    if table is not None:
        gv = (g * v[:, None, :]).sum(-1)                                 # [B, T]
        if needs[2]:
            rows = (w[..., None] * g).sum(1)                             # [B, d]
            grad_table = torch.zeros(table.shape, dtype=acc, device=table.device)
            grad_table = grad_table.index_add_(0, row_idx, rows).to(table.dtype)
        if needs[3]:
            pm = pos_mask.to(acc)
            grad_strength = ((pm * r0 if rms_scale else pm) * gv).sum(1).to(strength.dtype)
        if rms_scale and (needs[0] or needs[1]):
            g = g + (c * gv / (d * r0))[..., None] * m0
    grad_res = g.to(residual.dtype) if needs[0] else None
    grad_delta = g.to(delta.dtype) if needs[1] else None
    return grad_res, grad_delta, grad_table, grad_strength, grad_gamma, grad_dir


def _backward_args(args, grads, needs, op):
    gr, gd, gt, gs, gg, gdir = _backward(*grads, *args, (needs[0], needs[1], needs[2], needs[4],
                                                         needs[7], needs[10]))
    return gr, gd, gt, None, gs, None, None, gg, None, None, gdir, None, None


_OP = KernelOp(
    "fused_add_rmsnorm",
    "(Tensor residual, Tensor delta, Tensor? table, Tensor? row_idx, Tensor? strength, "
    "Tensor? pos_mask, bool rms_scale, Tensor? gamma, float eps, bool gemma, Tensor? directions, "
    "Tensor? readout, float edit_eps, str backend) -> (Tensor, Tensor, Tensor)",
    reference=fused_add_rmsnorm_reference, forward=_forward, backward=_backward_args,
    grad_args=(0, 1, 2, 4, 7, 10))


# --------------------------------------------------------------------------------------------
# dispatch without validation (the fused decoder layers call this on the hot path)
# --------------------------------------------------------------------------------------------
def fused_add_rmsnorm_unchecked(backend: str, requested: str, residual, delta, table, row_idx,
                                strength, pos_mask, rms_scale, gamma, eps, gemma, directions,
                                readout, edit_eps=EDIT_EPS):
    """``(m, n, P)`` with no argument checks; absent ``n`` / ``P`` are None or empty tensors.

    ``backend`` is the resolved backend (eager); ``requested`` the user's request string ("" for
    the default), passed to the custom op under ``torch.compile``. Callers validate once (the
    fused layers do at patch time). ``rms_scale``, ``gemma`` bool; ``eps``, ``edit_eps`` float.
    """
    if torch.compiler.is_compiling():
        return _OP(requested or None, residual, delta, table, row_idx, strength, pos_mask,
                   rms_scale, gamma, eps, gemma, directions, readout, edit_eps)
    return _OP.run(backend, residual, delta, table, row_idx, strength, pos_mask, rms_scale, gamma,
                   eps, gemma, directions, readout, edit_eps)


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------
def _check(residual, delta, table, row_idx, strength, pos_mask, gamma, directions, readout):
    name = "fused_add_rmsnorm"
    if residual.dim() != 3 or delta.shape != residual.shape:
        raise ValueError(f"{name}: residual and delta must be [B, T, d] of one shape; got "
                         f"{tuple(residual.shape)} and {tuple(delta.shape)}")
    B, T, d = residual.shape
    if residual.dtype not in FLOATS or delta.dtype not in FLOATS:
        raise TypeError(f"{name}: residual and delta must be fp32/bf16/fp16 (fp64: reference "
                        f"only); got {residual.dtype}, {delta.dtype}")
    check_devices(name, residual.device, delta=delta, table=table, row_idx=row_idx,
                  strength=strength, pos_mask=pos_mask, gamma=gamma, directions=directions,
                  readout=readout)
    if table is not None:
        if table.dim() != 2 or table.shape[1] != d:
            raise ValueError(f"{name}: table must be [E, d] with d = {d}; table has shape "
                             f"{tuple(table.shape)}, residual has shape {tuple(residual.shape)}")
        if table.dtype not in FLOATS:
            raise TypeError(f"{name}: table must be a float tensor, got {table.dtype}")
        if row_idx is None or strength is None or pos_mask is None:
            raise ValueError(f"{name}: an edit (table=) needs row_idx, strength and pos_mask")
        if row_idx.shape != (B,) or row_idx.dtype != torch.int64:
            raise ValueError(f"{name}: row_idx must be int64 [B={B}]; got {row_idx.dtype} "
                             f"{tuple(row_idx.shape)}")
        if strength.shape != (B,) or not strength.is_floating_point():
            raise ValueError(f"{name}: strength must be a float [B={B}] tensor; got "
                             f"{strength.dtype} {tuple(strength.shape)}")
        if pos_mask.shape != (B, T) or pos_mask.dtype != torch.bool:
            raise ValueError(f"{name}: pos_mask must be bool [B={B}, T={T}]; got "
                             f"{pos_mask.dtype} {tuple(pos_mask.shape)}")
    if gamma is not None and (gamma.shape != (d,) or gamma.dtype not in FLOATS):
        raise ValueError(f"{name}: gamma must be a float [d={d}] tensor; got {gamma.dtype} "
                         f"{tuple(gamma.shape)}")
    if directions is not None:
        if directions.dim() != 2 or directions.shape[1] != d or not 1 <= directions.shape[0] <= MAX_K:
            raise ValueError(f"{name}: directions must be [K, d={d}] with 1 <= K <= {MAX_K}; got "
                             f"{tuple(directions.shape)}")
        if directions.dtype not in FLOATS:
            raise TypeError(f"{name}: directions must be a float tensor, got {directions.dtype}")
        if readout is None or readout.shape != (B,) or readout.dtype != torch.int64:
            raise ValueError(f"{name}: projections need readout, int64 [B={B}]; got "
                             f"{None if readout is None else (readout.dtype, tuple(readout.shape))}")


def fused_add_rmsnorm(residual: Tensor, delta: Tensor, table: Optional[Tensor] = None,
                      row_idx: Optional[Tensor] = None, strength: Optional[Tensor] = None,
                      pos_mask: Optional[Tensor] = None, rms_scale: bool = False,
                      gamma: Optional[Tensor] = None, eps: float = 1e-6, gemma: bool = False,
                      directions: Optional[Tensor] = None, readout: Optional[Tensor] = None,
                      backend: str | None = None, edit_eps: float = EDIT_EPS):
    """Residual add + per-row edit + RMSNorm (+ projections) in one pass; see the module doc.

    Args:
        residual, delta: [B, T, d] (``m = residual + delta`` as HF computes it).
        table: [E, d] edit vectors or None (no edit). row_idx: int64 [B]. strength: fp32 [B].
        pos_mask: bool [B, T]. rms_scale: scale the edit by ``rms(m0)`` (steering).
        gamma: [d] RMSNorm weight, or None (add + edit only). eps: the norm's epsilon.
        gemma: Gemma RMSNorm (``(1 + gamma)``, all fp32, cast at the end).
        directions: [K, d] or None; readout: int64 [B]: ``P = m[b, readout[b]] @ directions.T``.
        backend: ``None`` (``$EMOKERNELS_BACKEND`` or auto), ``"auto"``, ``"reference"``,
            ``"cpu"``, ``"triton"`` or ``"cuda"``.
        edit_eps: epsilon of the edit's rms (``rms_scale``).
    Returns:
        ``(m, n)``, or ``(m, n, P)`` when ``directions`` is given; ``n`` is None without
        ``gamma``. ``m``, ``n`` in the activation dtype, ``P`` fp32 [B, K].
    """
    _check(residual, delta, table, row_idx, strength, pos_mask, gamma, directions, readout)
    m, n, P = _OP(backend, residual, delta, table, row_idx, strength, pos_mask, bool(rms_scale),
                  gamma, float(eps), bool(gemma), directions, readout, float(edit_eps))
    n = n if gamma is not None else None
    P = P if directions is not None else None
    return (m, n) if directions is None else (m, n, P)
