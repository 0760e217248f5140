"""Setup shared by the CUDA kernel test modules (run on the GPU machine by bench/gpu_check.sh)."""
from __future__ import annotations

import pytest
import torch

DEV = torch.device("cuda")
BACKENDS = ["cuda", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def require_cuda() -> None:
    """Skip the calling module as a whole without a CUDA device (one line in the summary)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device", allow_module_level=True)


def tol(dtype: torch.dtype, fp32_atol: float = 1e-5) -> dict:
    """assert_close tolerances against the fp32 reference: tight in fp32, about one rounding of
    the output in bf16 / fp16."""
    return {torch.float32: dict(rtol=1e-5, atol=fp32_atol),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
            torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]
