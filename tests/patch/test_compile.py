"""Patched models under ``torch.compile``: KV-cached decode with a static cache, the way
transformers' generate compiles it (eager prefill, compiled decode steps).

``fullgraph=True`` proves the patch adds no graph break (a break would cost the CUDA-graph speed-up
of ``mode="reduce-overhead"`` on a GPU); ``aot_eager`` keeps the test fast on the CPU. The same
check with inductor and CUDA graphs is in ``tests/gpu/test_compile_cuda.py``.
"""
from __future__ import annotations

import pytest
import torch
from transformers import StaticCache

from emokernels import Intervention, patch
from emokernels.models import Adapter
from tests.helpers import tiny

B, T, STEPS = 3, 9, 3
ROWS = torch.tensor([2, 0, 1])


def _vecs(seed, width, E=3, scale=0.3, n=4):
    g = torch.Generator().manual_seed(seed)
    return {l: scale * torch.randn(E, width, generator=g) for l in range(n)}


def _interventions(kind: str):
    if kind == "steer":
        return [Intervention(site="resid_post", op="add_rms", layers=(1, 2), positions=("readout", "generated"),
                             vectors=_vecs(1, 64, scale=0.2), rows=ROWS, strength=torch.tensor([1.0, -2.0, 0.5]))]
    if kind == "bias":
        return [Intervention(site="attn_out", op="add", layers=range(4), positions="all", vectors=_vecs(2, 64), rows=ROWS),
                Intervention(site="mlp_out", op="add", layers=range(4), positions=("readout", "generated"),
                             vectors=_vecs(3, 64), rows=ROWS)]
    if kind == "circuit":
        g = torch.Generator().manual_seed(4)
        return [Intervention(site="neurons", op="edit", layers=range(4), positions=("readout", "generated"),
                             index={l: torch.randperm(128, generator=g)[:5] for l in range(4)},
                             add={l: torch.randn(3, 5, generator=g) for l in range(4)}, rows=ROWS),
                Intervention(site="heads", op="edit", layers=range(4), positions="all",
                             index={l: torch.tensor([1, 3]) for l in range(4)},
                             scale={l: torch.rand(3, 2, generator=g) for l in range(4)}, rows=ROWS)]
    if kind == "prompt_only":  # acts on the prompt's KV cache only: the mask must be off in decode
        return [Intervention(site="resid_post", op="add", layers=range(4), positions="prompt", vectors=_vecs(5, 64),
                             rows=ROWS)]
    raise ValueError(kind)


def _decode(model, ids, ivs, backend, compiled: bool):
    """Logits of STEPS decode steps (fixed tokens) after an eager prefill, with a static cache."""
    kw = Adapter.of(model).cache_kwarg  # ``cache`` or ``past_key_values``, by transformers version
    with torch.no_grad(), patch(model, *ivs, backend=backend):
        cache = StaticCache(config=model.config, max_cache_len=T + STEPS)
        model(input_ids=ids, use_cache=True, **{kw: cache})
        step = torch.compile(model.forward, backend="aot_eager", fullgraph=True) if compiled else model.forward
        logits = []
        for s in range(STEPS):
            o = step(input_ids=ids[:, s:s + 1], use_cache=True, **{kw: cache}, position_ids=torch.full((B, 1), T + s))
            logits.append(o.logits[:, -1])
    return torch.stack(logits)


@pytest.fixture(scope="module")
def model_ids():
    model, _ = tiny("llama")
    ids = torch.randint(10, 400, (B, T), generator=torch.Generator().manual_seed(0))
    return model, ids


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("kind", ["steer", "bias", "circuit", "prompt_only"])
def test_compiled_decode_equals_eager(model_ids, kind, backend):
    model, ids = model_ids
    torch._dynamo.reset()
    eager = _decode(model, ids, _interventions(kind), backend, compiled=False)
    compiled = _decode(model, ids, _interventions(kind), backend, compiled=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    plain = _decode(model, ids, [], backend, compiled=False)
    assert (eager - plain).abs().max() > 1e-3  # the edit acts (on the prompt's cache for prompt_only)


def test_compiled_step_without_a_prefill_under_the_patch_is_a_clear_error(model_ids):
    model, ids = model_ids
    kw = Adapter.of(model).cache_kwarg
    torch._dynamo.reset()
    cache = StaticCache(config=model.config, max_cache_len=T + STEPS)
    with torch.no_grad():
        nxt = model(input_ids=ids, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)  # unpatched prefill
        with patch(model, *_interventions("steer"), backend="fused"):
            step = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
            with pytest.raises(Exception, match="run the prefill eagerly"):
                step(input_ids=nxt, use_cache=True, **{kw: cache}, position_ids=torch.full((B, 1), T))


def test_static_cache_eager_decode_matches_dynamic_cache(model_ids):
    """Eager calls with a static cache read its length on the host: same as a dynamic cache."""
    model, ids = model_ids
    ivs = _interventions("steer")
    kw = Adapter.of(model).cache_kwarg
    static = _decode(model, ids, ivs, "fused", compiled=False)
    with torch.no_grad(), patch(model, *ivs, backend="fused"):
        cache, dyn = model(input_ids=ids, use_cache=True).past_key_values, []
        for s in range(STEPS):
            o = model(input_ids=ids[:, s:s + 1], use_cache=True, **{kw: cache},
                      position_ids=torch.full((B, 1), T + s))
            dyn.append(o.logits[:, -1])
            cache = o.past_key_values
    torch.testing.assert_close(static, torch.stack(dyn), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["steer", "bias"])
def test_compiled_fused_gemma_decode_equals_eager(kind):
    """Gemma's fused layers (post-sublayer norms, 1 + γ norm) compile without a graph break too."""
    model, _ = tiny("gemma2")
    ids = torch.randint(10, 400, (B, T), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    eager = _decode(model, ids, _interventions(kind), "fused", compiled=False)
    compiled = _decode(model, ids, _interventions(kind), "fused", compiled=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert (eager - _decode(model, ids, [], "fused", compiled=False)).abs().max() > 1e-3
