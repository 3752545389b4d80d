"""Deployment: the whole NMS-free model as one ONNX graph (:mod:`.onnx_export`), its int8 versions
(:mod:`.quantize`) and an ONNX Runtime or OpenVINO predictor with the PyTorch model's per-image outputs
(:mod:`.runtime`). Needs ``pip install isda[export]`` (``isda[openvino]`` for the OpenVINO runtime)."""

from __future__ import annotations

import importlib

from ..engine.checkpoint import CheckpointError


EXTRAS = {"openvino": "openvino"}  # module -> the pip extra that installs it (default: export)


class ExportDependencyError(CheckpointError):
    """onnx / onnxruntime / openvino is not installed (a one-line user error)."""


def require(*modules: str) -> None:
    """Import ``modules`` or raise one line that says how to install them."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            extra = EXTRAS.get(name, "export")
            raise ExportDependencyError(f"{name} is not installed: pip install 'isda[{extra}]'"
                                        + (" (onnx, onnxruntime)" if extra == "export" else "")) from None
