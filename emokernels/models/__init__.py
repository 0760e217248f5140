"""Model zoo loading and architecture adapters."""
from .adapters import Adapter, LayerSites, UnsupportedArchitectureError
from .loader import ZOO, ModelNotInstalledError, ModelSourceError, load

__all__ = ["Adapter", "LayerSites", "UnsupportedArchitectureError", "ZOO", "ModelNotInstalledError", "ModelSourceError", "load"]
