"""int8 versions of an exported graph: the convolutions (backbone, neck, mask features) statically quantised
(QDQ, activation ranges calibrated on images), the transformer's linear layers dynamically
(:func:`isda.deploy.onnx_export.quantize_transformer`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig, from_dict
from ..engine.checkpoint import CheckpointError
from . import require
from .onnx_export import quantize_transformer

CONV_SCOPES = ("/backbone/", "/neck/", "/mask_features/")


def calibration_images(folder: str | os.PathLike, count: int) -> list[Path]:
    """The first ``count`` images of ``folder`` (sorted by name), or one line saying why there are none."""
    from ..data.images import IMAGE_EXTS

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"calibration images: no such folder: {folder}")
    if count < 1:
        raise CheckpointError(f"calibration image count must be >= 1, got {count}")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise CheckpointError(f"calibration images: no images ({', '.join(sorted(IMAGE_EXTS))}) in {folder}")
    return files[:count]


def calibration_feed(path: Path, data_cfg: DataConfig) -> dict[str, np.ndarray]:
    """An image file -> the graph's feed, resized like the test pipeline (:func:`isda.inference.resize_for_test`)."""
    from ..data import load_rgb
    from ..inference import resize_for_test

    image = resize_for_test(torch.from_numpy(load_rgb(path)).permute(2, 0, 1).float() / 255, data_cfg)
    return {"image": image[None].numpy(), "output_size": np.asarray(image.shape[1:], dtype=np.int64)}


def quantize_int8(src: str | os.PathLike, out: str | os.PathLike, images: list[Path]) -> dict[str, int]:
    """``src`` (an ``isda export`` file) -> ``out``: every Conv of the backbone, neck and mask features
    statically quantised (per-channel int8 weights, uint8 activations with MinMax ranges over ``images``,
    QDQ format), then the transformer's MatMul/Gemm nodes dynamically. Heads, the attention core and the
    post-processing stay float. Written atomically; returns the number of nodes quantised per kind."""
    require("onnx", "onnxruntime")
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    proto = onnx.load(str(src), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if "isda.config" not in meta:
        raise CheckpointError(f"{src}: not an isda ONNX export (no isda metadata)")
    data_cfg = from_dict(json.loads(meta["isda.config"])).data
    convs = [n.name for n in proto.graph.node if n.op_type == "Conv" and n.name.startswith(CONV_SCOPES)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.paths = iter(images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            path = next(self.paths, None)
            return None if path is None else calibration_feed(path, data_cfg)

    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.static.tmp")
    try:
        # Calibration runs the graph with every quantised tensor as an extra output (reduced to its range).
        quantize_static(str(src), str(tmp), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                        nodes_to_quantize=convs, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        linear = quantize_transformer(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"Conv (static)": len(convs), "MatMul/Gemm (dynamic)": len(linear)}
