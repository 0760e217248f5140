"""fused_add_rmsnorm: every CPU-runnable backend against the reference (Triton under TRITON_INTERPRET=1)."""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.helpers import FUSED_CONFIGS, compile_matches_eager, fused_residual_inputs, op_backends, uses_custom_op

from emokernels.ops import backends
from emokernels.ops.fused_residual import fused_add_rmsnorm, fused_add_rmsnorm_reference

fr_mod = importlib.import_module("emokernels.ops.fused_residual")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, T, d): decode at SmolLM2 width, odd sizes, d=1, a ragged non-power-of-2 d
SHAPES = [(1, 1, 576), (2, 3, 77), (3, 5, 128), (2, 2, 1), (1, 4, 577)]
CONFIGS = FUSED_CONFIGS  # (edit, rms_scale, norm, gemma, project)
BACKENDS = op_backends()
_inputs = fused_residual_inputs


def _tol(dtype):
    return {torch.float32: dict(rtol=1e-5, atol=1e-5),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
            torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]


def _interp_tol(dtype):
    """Triton's interpreter truncates fp32 -> bf16 (TOOLCHAIN.md §3), twice here (m0, then m)."""
    return dict(rtol=4e-2, atol=4e-2) if dtype == torch.bfloat16 else _tol(dtype)


def _ptol(dtype, d, tol=None):
    """P sums d products of activation-dtype values: its tolerance grows with sqrt(d)."""
    t = tol or _tol(dtype)
    return dict(rtol=t["rtol"], atol=t["atol"] * max(1.0, d ** 0.5))


def _ref(res, delta, kw):
    return fused_add_rmsnorm_reference(res, delta, **kw)


def _compare(out, ref, dtype, d, backend=None):
    tol = _interp_tol(dtype) if backend == "triton" and backends.triton_interpreting() else _tol(dtype)
    m, n = out[0], out[1]
    torch.testing.assert_close(m, ref[0], **tol)
    if ref[1] is None:
        assert n is None
    else:
        assert n.dtype == ref[1].dtype
        torch.testing.assert_close(n, ref[1], **tol)
    if ref[2] is not None:
        assert out[2].dtype == torch.float32 and out[2].shape == ref[2].shape
        torch.testing.assert_close(out[2], ref[2], **_ptol(dtype, d, tol))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=str)
def test_matches_reference(backend, dtype, shape, cfg):
    res, delta, kw = _inputs(*shape, dtype, CONFIGS[cfg])
    ref = _ref(res, delta, kw)
    out = fused_add_rmsnorm(res, delta, backend=backend, **kw)
    assert len(out) == (3 if "directions" in kw else 2)
    assert out[0].dtype == dtype and out[0].shape == res.shape
    _compare(out, ref, dtype, shape[2], backend)
    exact_rounding = not (backend == "triton" and dtype == torch.bfloat16)  # interpreter truncates
    if exact_rounding:
        keep = ~kw["pos_mask"] if "pos_mask" in kw else torch.ones(shape[:2], dtype=torch.bool)
        assert torch.equal(out[0][keep], (res + delta)[keep]), "unedited rows must be HF's add, bitwise"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("table_dtype", DTYPES, ids=str)
def test_mixed_table_dtype(backend, table_dtype):
    res, delta, kw = _inputs(2, 3, 96, torch.bfloat16, CONFIGS["steer_norm_proj"], table_dtype)
    _compare(fused_add_rmsnorm(res, delta, backend=backend, **kw), _ref(res, delta, kw),
             torch.bfloat16, 96, backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unedited_path_is_hf(dtype):
    """m is HF's ``residual + hidden_states`` bit for bit; n is HF's LlamaRMSNorm (<= 1 ulp)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    res, delta, kw = _inputs(3, 7, 576, dtype, CONFIGS["add_norm"])
    norm = LlamaRMSNorm(576, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(kw["gamma"])
        m_hf = res + delta
        n_hf = norm(m_hf)
        m, n = fused_add_rmsnorm(res, delta, gamma=norm.weight, eps=1e-5, backend="cpu")
        mr, nr, _ = fused_add_rmsnorm_reference(res, delta, gamma=norm.weight, eps=1e-5)
    assert torch.equal(m, m_hf)
    assert torch.equal(mr, m_hf) and torch.equal(nr, n_hf)  # the reference *is* HF's code
    ulp = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    rel = ((n.double() - n_hf.double()).abs() / n_hf.double().abs().clamp_min(1e-30)).max().item()
    assert rel <= 4 * ulp, rel
    if dtype != torch.float32:  # rounding to 8/11 bits hides the variance's last-bit differences
        assert (n != n_hf).float().mean().item() < 0.02


def test_fp32_cpu_bitwise_without_rms():
    """Additive edit, no reduction before the write of m: m rounds exactly like the reference."""
    res, delta, kw = _inputs(3, 4, 200, torch.float32, CONFIGS["post_edit"])
    kw["rms_scale"] = False
    m, _ = fused_add_rmsnorm(res, delta, backend="cpu", **kw)
    assert torch.equal(m, _ref(res, delta, kw)[0])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cfg", ["steer_norm_proj", "gemma_proj", "edit_norm"])
def test_low_precision_error_vs_fp64(backend, dtype, cfg):
    """Error against an fp64 reference is within 2x of torch's (HF's) own error in that dtype."""
    shape = (4, 16, 256) if backend == "cpu" else (2, 4, 128)
    res, delta, kw = _inputs(*shape, dtype, CONFIGS[cfg], seed=1)
    kw64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    exact = fused_add_rmsnorm_reference(res.double(), delta.double(), **kw64)
    own = _ref(res, delta, kw)  # HF's computation in `dtype` (what an unfused model does)
    out = fused_add_rmsnorm(res, delta, backend=backend, **kw)
    # Triton's interpreter truncates fp32 -> bf16 instead of rounding (TOOLCHAIN.md §3), which
    # doubles the per-rounding error and biases P; the GPU test applies the plain 2x rule.
    factor = 4 if backend == "triton" and dtype == torch.bfloat16 and backends.triton_interpreting() else 2
    for i, name in enumerate(("m", "n", "P")):
        if own[i] is None:
            continue
        err_torch = (own[i].double() - exact[i]).abs().max().item()
        err = (out[i].double() - exact[i]).abs().max().item()
        assert err <= factor * err_torch + 1e-6, (name, err, err_torch)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", ["steer_norm_proj", "gemma_proj", "post_edit"])
def test_poisoned_output_fully_written(backend, dtype, cfg):
    B, T, d = 2, 5, 130
    res, delta, kw = _inputs(B, T, d, dtype, CONFIGS[cfg])
    m = torch.full_like(res, float("nan"))
    n = torch.full_like(res, float("nan")) if "gamma" in kw else None
    P = torch.full((B, 3), float("nan")) if "directions" in kw else None
    args = [kw.get(k) for k in ("table", "row_idx", "strength", "pos_mask")]
    out = fr_mod._forward(backend, res, delta, *args, kw["rms_scale"], kw.get("gamma"), 1e-6,
                          kw["gemma"], kw.get("directions"), kw.get("readout"), 1e-12,
                          out=(m, n, P))
    assert out[0].data_ptr() == m.data_ptr()
    for t in (m, n, P):
        assert t is None or not torch.isnan(t).any()
    ref = _ref(res, delta, kw)
    _compare((m, n, P), ref, dtype, d, backend)


def test_noncontiguous_empty_and_fp32_gamma():
    res, delta, kw = _inputs(3, 4, 64, torch.float32, CONFIGS["steer_norm_proj"])
    rt = res.transpose(0, 1).contiguous().transpose(0, 1)
    assert not rt.is_contiguous()
    _compare(fused_add_rmsnorm(rt, delta, backend="cpu", **kw), _ref(res, delta, kw),
             torch.float32, 64)
    kw0 = dict(kw, pos_mask=kw["pos_mask"][:, :0])
    out = fused_add_rmsnorm(res[:, :0], delta[:, :0], backend="cpu", **kw0)
    assert out[0].shape == (3, 0, 64) and out[1].shape == (3, 0, 64) and out[2].shape == (3, 3)
    # an fp32 gamma with bf16 activations: HF promotes n to fp32 (runs the reference)
    rb, db = res.bfloat16(), delta.bfloat16()
    m, n, _ = fused_add_rmsnorm(rb, db, backend="cpu", **kw)
    assert m.dtype == torch.bfloat16 and n.dtype == torch.float32
    _compare((m, n), _ref(rb, db, kw)[:2] + (None,), torch.bfloat16, 64)


def test_validation_messages():
    res, delta, kw = _inputs(2, 3, 16, torch.float32, CONFIGS["steer_norm_proj"])
    with pytest.raises(ValueError, match="one shape"):
        fused_add_rmsnorm(res, delta[:, :2], **kw)
    with pytest.raises(ValueError, match=r"table must be \[E, d\]"):
        fused_add_rmsnorm(res, delta, **dict(kw, table=kw["table"][:, :15]))
    with pytest.raises(ValueError, match="pos_mask"):
        fused_add_rmsnorm(res, delta, **dict(kw, pos_mask=kw["pos_mask"][:, :2]))
    with pytest.raises(ValueError, match="row_idx"):
        fused_add_rmsnorm(res, delta, **dict(kw, row_idx=kw["row_idx"].int()))
    with pytest.raises(ValueError, match="needs row_idx"):
        fused_add_rmsnorm(res, delta, **dict(kw, strength=None))
    with pytest.raises(ValueError, match="gamma"):
        fused_add_rmsnorm(res, delta, **dict(kw, gamma=kw["gamma"][:3]))
    with pytest.raises(ValueError, match="readout"):
        fused_add_rmsnorm(res, delta, **dict(kw, readout=None))
    with pytest.raises(ValueError, match="1 <= K"):
        fused_add_rmsnorm(res, delta, **dict(kw, directions=torch.zeros(65, 16)))
    with pytest.raises(TypeError, match="fp32"):
        fused_add_rmsnorm(res.int(), delta.int(), **kw)
    with pytest.raises(IndexError, match="row_idx"):  # the CPU kernel checks the ranges
        fused_add_rmsnorm(res, delta, backend="cpu", **dict(kw, row_idx=torch.tensor([0, 4])))
    with pytest.raises(IndexError, match="readout"):
        fused_add_rmsnorm(res, delta, backend="cpu", **dict(kw, readout=torch.tensor([0, 3])))


_GRAD_CFGS = ["steer_norm_proj", "gemma_proj", "post_edit", "edit_norm"]


@pytest.mark.parametrize("cfg", _GRAD_CFGS)
def test_gradcheck_fp64(cfg):
    res, delta, kw = _inputs(2, 3, 5, torch.float64, CONFIGS[cfg], table_dtype=torch.float64, E=3)
    names = [k for k in ("table", "strength", "gamma", "directions") if k in kw]
    for k in names:
        kw[k] = kw[k].double().requires_grad_()
    res.requires_grad_()
    delta.requires_grad_()

    def f(res, delta, *leaves):
        out = fused_add_rmsnorm(res, delta, **dict(kw, **dict(zip(names, leaves))))
        return tuple(t for t in out if t is not None)

    assert torch.autograd.gradcheck(f, (res, delta, *[kw[k] for k in names]))

    def f_op(res, delta, *leaves):  # the custom op's registered autograd
        k2 = dict(kw, **dict(zip(names, leaves)))
        m, n, P = torch.ops.emokernels.fused_add_rmsnorm(
            res, delta, k2.get("table"), k2.get("row_idx"), k2.get("strength"), k2.get("pos_mask"),
            k2["rms_scale"], k2.get("gamma"), 1e-6, k2["gemma"], k2.get("directions"),
            k2.get("readout"), 1e-12, "")
        return tuple(t for t in (m, n, P) if t.numel())

    assert torch.autograd.gradcheck(f_op, (res, delta, *[kw[k] for k in names]))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("cfg", _GRAD_CFGS)
def test_grad_native_forward_matches_autograd_of_reference(backend, cfg):
    B, T, d = 2, 3, 40
    res, delta, kw = _inputs(B, T, d, torch.float32, CONFIGS[cfg])
    names = ["res", "delta"] + [k for k in ("table", "strength", "gamma", "directions") if k in kw]
    g = torch.Generator().manual_seed(5)
    grads = []
    for fn in (lambda r, dl, **k: fused_add_rmsnorm(r, dl, backend=backend, **k),
               lambda r, dl, **k: fused_add_rmsnorm_reference(r, dl, **k)):
        leaves = {n: (res if n == "res" else delta if n == "delta" else kw[n]).clone().requires_grad_()
                  for n in names}
        k2 = dict(kw, **{n: leaves[n] for n in names[2:]})
        out = [t for t in fn(leaves["res"], leaves["delta"], **k2) if t is not None]
        loss = sum((t.float() * torch.randn(t.shape, generator=torch.Generator().manual_seed(i))).sum()
                   for i, t in enumerate(out))
        loss.backward()
        grads.append([leaves[n].grad for n in names])
    del g
    for n, a, b in zip(names, *grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("backend", [None, "reference", "cpu"])
def test_torch_compile_fullgraph(backend):
    # auto/reference trace the pure-torch reference (inductor fuses it); a named native backend stays one custom op
    res, delta, kw = _inputs(2, 3, 32, torch.float32, CONFIGS["steer_norm_proj"])

    def f(res, delta, table, gamma):
        m, n, P = fused_add_rmsnorm(res * 1.5, delta, **dict(kw, table=table, gamma=gamma), backend=backend)
        return (m * n).sum() + P.square().sum()

    ops = compile_matches_eager(f, [res, delta, kw["table"], kw["gamma"]])
    assert uses_custom_op(ops) == (backend == "cpu")

