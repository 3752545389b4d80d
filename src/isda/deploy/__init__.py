"""Deployment: the whole NMS-free model as one ONNX graph (:mod:`.onnx_export`) and an ONNX Runtime
predictor with the PyTorch model's per-image outputs (:mod:`.runtime`). Needs ``pip install isda[export]``."""

from __future__ import annotations

import importlib

from ..engine.checkpoint import CheckpointError


class ExportDependencyError(CheckpointError):
    """onnx / onnxruntime is not installed (a one-line user error)."""


def require(*modules: str) -> None:
    """Import ``modules`` or raise one line that says how to install them."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ExportDependencyError(f"{name} is not installed: pip install 'isda[export]' "
                                        "(onnx, onnxruntime)") from None
