"""emokernels: find and control emotion circuits inside transformer language models.

Workflow: data -> generate -> judge -> capture -> directions -> components -> influence ->
circuits -> control -> evaluate. ``emokernels.patch`` applies any intervention inside the
forward pass (reference hooks or fused kernels).
"""
import os as _os

# Spin-waiting OpenMP threads make generation 3-8x slower on a busy 2-core machine.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .patch import Intervention, patch  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Intervention", "patch", "__version__"]
