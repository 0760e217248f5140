"""The intervention spec and the ``patch()`` context manager."""
from .engine import PatchHandle, PatchState, patch
from .spec import OPS, POSITIONS, SITES, Intervention

__all__ = ["Intervention", "PatchHandle", "PatchState", "patch", "SITES", "OPS", "POSITIONS"]
