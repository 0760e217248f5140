"""Shared pytest setup. Runs before any test module imports torch / triton / emokernels.

* ``TRITON_INTERPRET=1`` when there is no CUDA device, so Triton kernels run on CPU tensors
  (Triton reads it when ``@triton.jit`` decorates, i.e. at import of the op modules).
* ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of spinning (the test machine
  has 2 cores shared with other work).
* ``HF_HUB_OFFLINE=1``: never touch the network.
* Markers: ``gpu`` (needs CUDA; skipped without it) and ``slow``.
"""
from __future__ import annotations

import os

# Before torch is imported: OpenMP reads the wait policy once, at start-up.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _has_cuda_device() -> bool:
    import torch  # importing torch does not import triton or emokernels

    return torch.cuda.is_available()


if not _has_cuda_device():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: slow test (deselect with -m 'not slow')")
    # triton 3.6's interpreter converts 1-element arrays with int(); numpy >= 1.25 warns
    config.addinivalue_line("filterwarnings",
                            "ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread avoids OpenMP wake-up stalls on the shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
