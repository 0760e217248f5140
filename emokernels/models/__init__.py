"""Model zoo loading and architecture adapters."""
from .adapters import Adapter, LayerSites, UnsupportedArchitectureError
from .loader import ZOO, ModelNotInstalledError, load

__all__ = ["Adapter", "LayerSites", "UnsupportedArchitectureError", "ZOO", "ModelNotInstalledError", "load"]
