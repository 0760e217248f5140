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
from latency import Workload, conditions  # noqa: E402

from emokernels.models import load  # noqa: E402

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
    ids = torch.randint(10, 1000, (2, 32))
    factory = conditions(model, wl, batch=2)[condition]
    with torch.no_grad(), factory() as fwd:
        if phase == "prefill":
            out = benchmark(lambda: fwd(input_ids=ids, use_cache=False))
        else:
            cache = fwd(input_ids=ids, use_cache=True).past_key_values

            def step():
                o = fwd(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
                cache.crop(-1)  # drop the new token: every step runs at the same length
                return o

            out = benchmark(step)
    assert torch.isfinite(out.logits).all()
