"""ONNX Runtime (or OpenVINO) inference with the PyTorch model's interface: ``model(images, output_sizes=...)``
-> per-image dicts (``masks`` bool [K, H, W], ``labels``, ``scores``, ``boxes``, ``query_index``,
``reference_points``), so ``isda predict`` / ``isda eval`` and :func:`isda.engine.evaluate` run an exported file
unchanged."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..engine.checkpoint import CheckpointError
from ..config import ConfigError, from_dict
from ..models.isda import _check_images
from . import require
from .onnx_export import OUTPUTS

DETECTION_KEYS = ("scores", "labels", "masks", "boxes", "query_index", "reference_points")
RUNTIMES = ("onnxruntime", "openvino")
Infer = Callable[[dict[str, np.ndarray]], list[np.ndarray]]  # feed -> the outputs in OUTPUTS order


class OnnxISDA(nn.Module):
    """An exported ISDA graph in ONNX Runtime (CPU unless other ``providers`` are named; every graph
    optimisation on) or in OpenVINO (``runtime="openvino"``, CPU; ``pip install isda[openvino]``). An
    ``nn.Module`` without parameters only so that code written for the PyTorch model (``eval()``,
    ``train(mode)``) runs it as is; images go one at a time (the graph takes batch 1)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",), runtime: str = "onnxruntime") -> None:
        super().__init__()
        if runtime not in RUNTIMES:
            raise CheckpointError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        require(runtime)
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"ONNX model not found: {path}")
        try:
            if runtime == "openvino":
                self._infer, self.metadata, names = _openvino(path, threads)
            else:
                self._infer, self.metadata, names = _onnxruntime(path, threads, providers)
        except Exception as e:  # not an ONNX file, truncated, unsupported opset
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{path}: not a loadable ONNX model ({first})") from None
        if "isda.config" not in self.metadata or names != list(OUTPUTS):
            raise CheckpointError(f"{path}: not an isda ONNX export (no isda metadata or other outputs: {names})")
        self.path, self.runtime = path, runtime

    def forward(self, images: list[Tensor], output_sizes: list[tuple[int, int]] | None = None) -> list[dict[str, Tensor]]:
        _check_images(images)
        sizes = output_sizes or [tuple(im.shape[1:]) for im in images]
        return [detections(self._run(im, size)) for im, size in zip(images, sizes)]

    def _run(self, image: Tensor, output_size: tuple[int, int]) -> dict[str, Tensor]:
        feed = {"image": image[None].detach().float().cpu().contiguous().numpy(),
                "output_size": np.asarray(output_size, dtype=np.int64)}
        return {name: torch.from_numpy(value) for name, value in zip(OUTPUTS, self._infer(feed))}

    def predict_one(self, image: Tensor, output_size: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """All the graph's outputs for one image [3, H, W] in [0, 1]."""
        _check_images([image])
        return self._run(image, output_size or tuple(image.shape[1:]))

    def record_sampling(self, enabled: bool = True) -> None:
        if enabled:
            raise CheckpointError("sampling points are not outputs of the ONNX graph: use the .pt checkpoint "
                                  "for --show-sampling-points")


def session_options(threads: int | None = None, optimization: str = "all") -> "onnxruntime.SessionOptions":
    """ONNX Runtime settings of :class:`OnnxISDA` (shared with ``benchmarks.profile_onnx``): every graph
    optimisation, no memory pattern. The pattern (ONNX Runtime's default) plans one block for a run's tensors and
    allocates it afresh on the next run of that input size: every page of the gigabytes an 800x1216 image needs
    is first-touched again, and the profiler charged the time to whichever node touched them first (a Slice of
    the upsampled masks took a sixth of the run). Without it the arena's blocks are reused from the first run."""
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
    return options


def _onnxruntime(path: Path, threads: int | None, providers: tuple[str, ...]
                 ) -> tuple[Infer, dict[str, str], list[str]]:
    import onnxruntime as ort

    options = session_options(threads)
    ort_session = ort.InferenceSession(str(path), options, providers=list(providers))
    names = [o.name for o in ort_session.get_outputs()]
    return (lambda feed: ort_session.run(None, feed)), ort_session.get_modelmeta().custom_metadata_map, names


def _openvino(path: Path, threads: int | None) -> tuple[Infer, dict[str, str], list[str]]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))  # the ONNX frontend; the file's metadata props land in rt_info "framework"
    info = model.get_rt_info()
    metadata = {key: model.get_rt_info(["framework", key]).astype(str)
                for key in (info["framework"] if "framework" in info else {})}
    names = [o.get_any_name() for o in model.outputs]
    # float32 throughout: on CPUs with bf16 units OpenVINO would otherwise compute in bf16.
    config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()

    def infer(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = request.infer(feed)
        return [np.array(result[out]) for out in compiled.outputs]  # copies: the request reuses its buffers

    return infer, metadata, names


def load_onnx_model(path: str | os.PathLike, threads: int | None = None, runtime: str = "onnxruntime"):
    """An ``isda export`` file -> :class:`isda.inference.LoadedModel` (the ONNX Runtime session, the stored config, classes)."""
    from ..inference import LoadedModel

    model = OnnxISDA(path, threads, runtime=runtime)
    try:
        cfg = from_dict(json.loads(model.metadata["isda.config"])).validate()
        names = json.loads(model.metadata["isda.class_names"])
        cat_ids = json.loads(model.metadata["isda.cat_ids"])
    except (ConfigError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: isda metadata unreadable ({e})") from None
    return LoadedModel(model, cfg, names, cat_ids)


def detections(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The per-image dict of the PyTorch model from the graph's outputs."""
    return {key: outputs[key] for key in DETECTION_KEYS}
