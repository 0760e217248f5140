"""fused_add_rmsnorm and the fused decoder layers on a CUDA device (``cuda`` and ``triton`` backends)."""
from __future__ import annotations

import functools
import importlib

import pytest
import torch

from tests.gpu.common import BACKENDS, DEV, DTYPES, require_cuda, tol

pytestmark = pytest.mark.gpu
require_cuda()

from emokernels import Intervention, patch  # noqa: E402
from emokernels.ops import backends  # noqa: E402
from emokernels.ops.fused_residual import fused_add_rmsnorm, fused_add_rmsnorm_reference  # noqa: E402

from tests.helpers import FUSED_CONFIGS, fused_residual_inputs  # noqa: E402

fr_mod = importlib.import_module("emokernels.ops.fused_residual")

# (B, T, d): decode at Llama-3.2-3B / 8B width, prefill, odd sizes, d=1, the cuda kernel's largest
# d (16384) and one past it (falls back to triton with a warning)
SHAPES = [(1, 1, 3072), (4, 257, 3072), (1, 1, 4096), (2, 3, 77), (2, 2, 1), (1, 4, 577),
          (2, 5, 8192), (1, 3, 16384), (1, 2, 16385)]
# Triton compiles one kernel per (BLOCK = next_pow2(d), flags, dtypes): fewer distinct widths
TRITON_SHAPES = [(1, 1, 3072), (4, 257, 3000), (2, 3, 77), (2, 2, 1)]
CASES = [("cuda", s) for s in SHAPES] + [("triton", s) for s in TRITON_SHAPES]
CONFIGS = {k: v for k, v in FUSED_CONFIGS.items() if k != "post_proj"}
_inputs = functools.partial(fused_residual_inputs, E=6, K=5, device=DEV)


def _compare(out, ref, dtype, d):
    t = tol(dtype)
    torch.testing.assert_close(out[0], ref[0], **t)
    if ref[1] is not None:
        torch.testing.assert_close(out[1], ref[1], **t)
    if ref[2] is not None:
        torch.testing.assert_close(out[2], ref[2], rtol=t["rtol"], atol=t["atol"] * max(1.0, d ** 0.5))


def test_auto_backend_is_cuda():
    backends._reset_for_tests()
    assert backends.resolve_backend(DEV, "auto") == "cuda", backends.cuda_ext_error()


@pytest.mark.parametrize("backend,shape", CASES, ids=lambda c: c if isinstance(c, str) else "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_matches_reference(backend, dtype, shape, cfg):
    res, delta, kw = _inputs(*shape, dtype, CONFIGS[cfg])
    ref = fused_add_rmsnorm_reference(res, delta, **kw)
    out = fused_add_rmsnorm(res, delta, backend=backend, **kw)
    _compare(out, ref, dtype, shape[2])
    keep = ~kw["pos_mask"] if "pos_mask" in kw else torch.ones(shape[:2], dtype=torch.bool, device=DEV)
    assert torch.equal(out[0][keep], (res + delta)[keep]), "unedited rows must be torch's add, bitwise"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("table_dtype", DTYPES, ids=str)
def test_mixed_table_dtype(backend, table_dtype):
    res, delta, kw = _inputs(3, 7, 3000, torch.bfloat16, CONFIGS["steer_norm_proj"], table_dtype)
    _compare(fused_add_rmsnorm(res, delta, backend=backend, **kw),
             fused_add_rmsnorm_reference(res, delta, **kw), torch.bfloat16, 3000)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cfg", ["steer_norm_proj", "gemma_proj", "edit_norm"])
def test_low_precision_error_vs_fp64(backend, dtype, cfg):
    res, delta, kw = _inputs(8, 64, 3000, dtype, CONFIGS[cfg], seed=1)
    kw64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    exact = fused_add_rmsnorm_reference(res.double(), delta.double(), **kw64)
    own = fused_add_rmsnorm_reference(res, delta, **kw)
    out = fused_add_rmsnorm(res, delta, backend=backend, **kw)
    for i, name in enumerate(("m", "n", "P")):
        if own[i] is None:
            continue
        err_torch = (own[i].double() - exact[i]).abs().max().item()
        err = (out[i].double() - exact[i]).abs().max().item()
        assert err <= 2 * err_torch + 1e-6, (name, err, err_torch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", ["steer_norm_proj", "gemma_proj", "post_edit"])
def test_poisoned_output_fully_written(backend, dtype, cfg):
    B, T, d = 3, 33, 3000
    res, delta, kw = _inputs(B, T, d, dtype, CONFIGS[cfg])
    m = torch.full_like(res, float("nan"))
    n = torch.full_like(res, float("nan")) if "gamma" in kw else None
    P = torch.full((B, 5), float("nan"), device=DEV) if "directions" in kw else None
    args = [kw.get(k) for k in ("table", "row_idx", "strength", "pos_mask")]
    fr_mod._forward(backend, res, delta, *args, kw["rms_scale"], kw.get("gamma"), 1e-6, kw["gemma"],
                    kw.get("directions"), kw.get("readout"), 1e-12, out=(m, n, P))
    for t in (m, n, P):
        assert t is None or not torch.isnan(t).any()
    _compare((m, n, P), fused_add_rmsnorm_reference(res, delta, **kw), dtype, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_native_forward_matches_autograd_of_reference(backend):
    res, delta, kw = _inputs(2, 3, 77, torch.float32, CONFIGS["steer_norm_proj"])
    names = ["table", "strength", "gamma", "directions"]
    grads = []
    for fn in (lambda r, d, **k: fused_add_rmsnorm(r, d, backend=backend, **k),
               lambda r, d, **k: fused_add_rmsnorm_reference(r, d, **k)):
        leaves = [t.clone().requires_grad_() for t in (res, delta, *[kw[n] for n in names])]
        out = fn(leaves[0], leaves[1], **dict(kw, **dict(zip(names, leaves[2:]))))
        g = torch.Generator(device=DEV).manual_seed(1)
        sum((t * torch.randn(t.shape, device=DEV, generator=g)).sum() for t in out).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", [None, "cuda", "triton"])
def test_torch_compile_fullgraph_cuda(backend):
    res, delta, kw = _inputs(2, 3, 256, torch.bfloat16, CONFIGS["steer_norm_proj"])

    def f(res, delta):
        m, n, P = fused_add_rmsnorm(res, delta, **kw, backend=backend)
        return m.float().sum() + n.float().sum() + P.sum()

    cf = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(cf(res, delta), f(res, delta), rtol=1e-3, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# fused decoder layers on the GPU
# ---------------------------------------------------------------------------------------------
def _tiny(dtype):
    from emokernels.models import load

    model, _ = load("tiny-llama", dtype=torch.float32)
    return model.to(DEV, dtype)


def _ivs(E=3, B=3):
    g = torch.Generator().manual_seed(0)
    V = lambda s: {l: (s * torch.randn(E, 64, generator=g)).to(DEV) for l in range(4)}  # noqa: E731
    rows = torch.tensor([2, 0, 1], device=DEV)[:B]
    return [Intervention(site="attn_out", op="add", layers=range(4), positions="all", vectors=V(0.3), rows=rows),
            Intervention(site="mlp_out", op="add", layers=range(4), positions=("readout", "generated"),
                         vectors=V(0.3), rows=rows),
            Intervention(site="resid_post", op="add_rms", layers=(1, 2), positions="all", vectors=V(0.1), rows=rows),
            Intervention(site="resid_mid", op="project", layers=range(4), positions="readout",
                         directions={l: torch.randn(5, 64, generator=g).to(DEV) for l in range(4)}, name="p")]


def test_fused_layers_match_hooks_on_cuda():
    ids = torch.randint(10, 400, (3, 17), generator=torch.Generator().manual_seed(0)).to(DEV)
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _tiny(dtype)
        for backend in ("reference", "fused"):
            with torch.no_grad(), patch(model, *_ivs(), backend=backend) as h:
                logits = model(input_ids=ids).logits.double()
                gen = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
            outs[dtype, backend] = (logits, gen, h.captures["p"][3][0])
    exact = outs[torch.float32, "reference"]
    torch.testing.assert_close(outs[torch.float32, "fused"][0], exact[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(outs[torch.float32, "fused"][1], exact[1])
    err_ref = (outs[torch.bfloat16, "reference"][0] - exact[0]).abs().max().item()
    err_fus = (outs[torch.bfloat16, "fused"][0] - exact[0]).abs().max().item()
    assert err_fus <= 2 * err_ref + 1e-3, (err_fus, err_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_scalar_and_vector_paths(dtype):
    """>= 128 rows, 16-byte-aligned, d % (16 / itemsize) == 0: the vectorised kernel; a contiguous
    view at an odd storage offset (misaligned) takes the scalar one; both match the reference."""
    res, delta, kw = _inputs(4, 40, 3072, dtype, CONFIGS["steer_norm_proj"])
    ref = fused_add_rmsnorm_reference(res, delta, **kw)
    _compare(fused_add_rmsnorm(res, delta, backend="cuda", **kw), ref, dtype, 3072)
    buf = torch.empty(res.numel() + 1, dtype=dtype, device=DEV)
    mis = buf[1:].view(res.shape)
    mis.copy_(res)
    assert mis.is_contiguous() and mis.data_ptr() % 16 != 0
    _compare(fused_add_rmsnorm(mis, delta, backend="cuda", **kw), ref, dtype, 3072)
