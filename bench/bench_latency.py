"""pytest-benchmark view of bench/latency.py: one decode step and one prefill of a tiny model,
unpatched vs paper-style hooks vs emokernels (reference / fused / compiled bias).

    python -m pytest bench/bench_latency.py --benchmark-only         # time it
    python -m pytest bench/bench_latency.py --benchmark-disable      # CI: run each once

The side-by-side table with paired ratios comes from ``python bench/latency.py``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import CompiledDecode, Workload, conditions  # noqa: E402

from emokernels.models import Adapter, load  # noqa: E402

CONDITIONS = ("unpatched", "hooks_steer", "emk_ref_steer", "emk_fused_steer", "hooks_circuit", "emk_fused_circuit",
              "emk_fused_bias", "folded_bias")


@pytest.fixture(scope="module")
def tiny():
    model, _ = load("tiny-llama", dtype=torch.float32)
    return model, Workload(model)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("condition", CONDITIONS)
def test_bench_intervention(benchmark, tiny, condition, phase):
    model, wl = tiny
    kw = Adapter.of(model).cache_kwarg
    ids = torch.randint(10, 1000, (2, 32))
    factory = conditions(model, wl, batch=2)[condition]
    with torch.no_grad(), factory() as fwd:
        if phase == "prefill":
            out = benchmark(lambda: fwd(input_ids=ids, use_cache=False))
        else:
            cache = fwd(input_ids=ids, use_cache=True).past_key_values

            def step():
                o = fwd(input_ids=ids[:, -1:], use_cache=True, **{kw: cache})
                cache.crop(-1)  # drop the new token: every step runs at the same length
                return o

            out = benchmark(step)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("condition", ["unpatched", "hooks_steer", "emk_fused_bias"])
def test_bench_compiled_decode(benchmark, tiny, condition):
    """The compiled-decode condition (aot_eager here; inductor + CUDA graphs on the GPU): its
    shared-weight copy keeps the patch installed and gives the eager condition's logits."""
    model, wl = tiny
    kw = Adapter.of(model).cache_kwarg
    ids = torch.randint(10, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch.no_grad():
        cd = CompiledDecode(model, condition, batch=2, prompt=32, steps=2, mode="default", backend="aot_eager")
        try:
            benchmark(lambda: cd.time(ids, torch.device("cpu")))
            cd.cache.reset()
            cd.model(input_ids=ids, use_cache=True, **{kw: cd.cache})
            got = cd.step(input_ids=ids[:, -1:], use_cache=True, position_ids=cd.positions[0], **{kw: cd.cache}).logits
        finally:
            cd.close()
        with conditions(model, wl, batch=2)[condition]() as fwd:
            out = fwd(input_ids=ids, use_cache=True)
            want = fwd(input_ids=ids[:, -1:], use_cache=True, **{kw: out.past_key_values}).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert all("forward" not in m.__dict__ and not m._forward_hooks and not m._forward_pre_hooks
               for m in model.modules()), "the copy's patch leaked onto the original model"
