"""ISDA: position-aware, NMS-free instance segmentation with deformable attention."""

from .config import Config, ConfigError, get_preset
from .models.isda import ISDA, build_model

__all__ = ["ISDA", "Config", "ConfigError", "build_model", "get_preset"]
__version__ = "0.1.0"
