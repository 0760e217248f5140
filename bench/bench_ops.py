"""Micro-benchmarks: each available backend of gather_add / capture_project against torch eager.

Run:  python -m pytest bench/bench_ops.py -q                      (timings)
      python -m pytest bench/bench_ops.py -q --benchmark-disable  (CI: every case runs once)

Shapes: decode (B=1, T=1, d=576) and prefill (B=8, T=128, d=576), fp32 and bf16, 6 directions.
"torch-eager" is the op's pure-torch reference (``*_reference``: what a Python hook would run);
``hook-naive`` is the shortest hand-written torch expression of the same edit, for scale.
Backends: ``cpu`` when the C++ module builds; ``cuda`` and ``triton`` on CUDA tensors when a GPU
is present (the Triton interpreter is not benchmarked: it is a test tool). CUDA cases
synchronise inside the timed call.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from emokernels.ops import (  # noqa: E402
    capture_project,
    capture_project_reference,
    gather_add,
    gather_add_reference,
    resolve_backend,
)
from emokernels.ops import backends as _backends  # noqa: E402

SHAPES = {"decode": (1, 1, 576), "prefill": (8, 128, 576)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
E = K = 6


def _cases():
    cases = [("cpu", "torch-eager"), ("cpu", "hook-naive")]
    if _backends.cpu_ext() is not None:
        cases.append(("cpu", "cpu"))
    if torch.cuda.is_available():
        cases += [("cuda", "torch-eager"), ("cuda", "hook-naive"), ("cuda", "triton")]
        if _backends.cuda_ext() is not None:
            cases.append(("cuda", "cuda"))
    return cases


CASES = _cases()
IDS = [f"{dev}-{impl}" for dev, impl in CASES]


def _timed(dev, fn):
    if dev == "cuda":
        def run():
            out = fn()
            torch.cuda.synchronize()
            return out
        return run
    return fn


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bench_gather_add(benchmark, case, shape, dtype):
    dev, impl = case
    B, T, d = shape
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, d, generator=g).to(dev, dtype)
    table = torch.randn(E, d, generator=g).to(dev, dtype)
    row_idx = torch.randint(0, E, (B,), generator=g).to(dev)
    strength = torch.full((B,), 0.5, device=dev)
    pos_mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    if impl == "torch-eager":
        fn = lambda: gather_add_reference(h, table, row_idx, strength, pos_mask, True)  # noqa: E731
    elif impl == "hook-naive":  # one emotion for the whole batch, every position
        v = table[0]

        def fn():
            r = torch.sqrt(h.float().square().mean(-1, keepdim=True) + 1e-12)
            return (h.float() + 0.5 * r * v.float()).to(dtype)
    else:
        assert resolve_backend(h.device, impl) == impl
        fn = lambda: gather_add(h, table, row_idx, strength, pos_mask, rms_scale=True,  # noqa: E731
                                backend=impl)
    with torch.no_grad():
        out = benchmark(_timed(dev, fn))
    assert out.shape == h.shape


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bench_capture_project(benchmark, case, shape, dtype):
    dev, impl = case
    B, T, d = shape
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, d, generator=g).to(dev, dtype)
    directions = torch.randn(K, d, generator=g).to(dev, dtype)
    index = torch.full((B,), T - 1, dtype=torch.long, device=dev)
    if impl == "torch-eager":
        fn = lambda: capture_project_reference(h, directions, index)  # noqa: E731
    elif impl == "hook-naive":  # same readout position in every row
        fn = lambda: h[:, -1].float() @ directions.float().t()  # noqa: E731
    else:
        assert resolve_backend(h.device, impl) == impl
        fn = lambda: capture_project(h, directions, index, backend=impl)  # noqa: E731
    with torch.no_grad():
        P = benchmark(_timed(dev, fn))
    assert P.shape == (B, K)
