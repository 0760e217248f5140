"""Patched decode under torch.compile(mode="reduce-overhead") on the GPU: inductor + CUDA graphs.

The patch must neither break the graph nor make inductor skip CUDA graphs (a host read of the
cache length or a CPU tensor in the graph would), and must give the eager patched logits.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from emokernels import Intervention, patch  # noqa: E402
from emokernels.models import Adapter  # noqa: E402

DEV = "cuda"
B, T, STEPS = 3, 11, 4


def _ivs():
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([2, 0, 1], device=DEV)
    V = lambda s: {l: (s * torch.randn(3, 64, generator=g)).to(DEV) for l in range(4)}  # noqa: E731
    return [Intervention(site="attn_out", op="add", layers=range(4), positions="all", vectors=V(0.3), rows=rows),
            Intervention(site="mlp_out", op="add", layers=range(4), positions=("readout", "generated"),
                         vectors=V(0.3), rows=rows),
            Intervention(site="resid_post", op="add_rms", layers=(1, 2), positions=("readout", "generated"),
                         vectors=V(0.1), rows=rows),
            Intervention(site="neurons", op="edit", layers=range(4), positions=("readout", "generated"),
                         index={l: torch.arange(5, device=DEV) * 7 for l in range(4)},
                         add={l: torch.randn(3, 5, generator=g).to(DEV) for l in range(4)}, rows=rows)]


def _decode(model, ids, compiled: bool):
    from transformers import StaticCache

    kw = Adapter.of(model).cache_kwarg
    with torch.no_grad(), patch(model, *_ivs(), backend="fused"):
        cache = StaticCache(config=model.config, max_cache_len=T + STEPS)
        model(input_ids=ids, use_cache=True, **{kw: cache})
        step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True) if compiled else model.forward
        out = []
        for s in range(STEPS):
            pos = torch.full((B, 1), T + s, device=DEV)
            nxt = ids[:, s:s + 1]  # fixed tokens: low-precision argmax may differ between the two
            torch.compiler.cudagraph_mark_step_begin()  # a new decode step (outputs are cloned below)
            out.append(step(input_ids=nxt, use_cache=True, **{kw: cache}, position_ids=pos).logits[:, -1].float().clone())
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reduce_overhead_decode_matches_eager_without_cudagraph_skips(dtype):
    from torch._dynamo.utils import counters

    from emokernels.models import load

    model, _ = load("tiny-llama", dtype=torch.float32)
    model = model.to(DEV, dtype)
    ids = torch.randint(10, 400, (B, T), generator=torch.Generator().manual_seed(1)).to(DEV)
    torch._dynamo.reset()
    counters.clear()
    eager = _decode(model, ids, compiled=False)
    compiled = _decode(model, ids, compiled=True)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol)
