"""``isda export``: the whole NMS-free model, pre- and post-processing included, as one ONNX graph.

Exporter: the TorchScript tracer (``torch.onnx.export(..., dynamo=False)``). A trace records the image's
height and width, and all shape arithmetic done on them (padding to a multiple of 32, level sizes, token
counts, the deformable attention's per-level split), as graph values, so one trace at one size serves every
size. The dynamo exporter (``dynamo=True``, torch 2.14) also exports this module, but specialises height and
width to the example's (the level sizes reach the attention core through the ``spatial_shapes`` tensor, data
to torch.export): its graph rejects any other size.
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..fileio import atomic_write_bytes
from ..models.isda import ISDA, mask_boxes, rank_detections
from . import require

OPSET = 17  # GridSample needs 16; LayerNormalization 17
INPUTS = {
    "image": "float32 [1, 3, H, W]: one RGB image, values in [0, 1] (not normalised: the graph subtracts the "
             "training mean, divides by the std and zero-pads to a multiple of 32 itself); any H, W",
    "output_size": "int64 [2]: (height, width) of the returned masks and boxes: the image's own (H, W), or the "
                   "original photo's size when the image was resized for the model",
}
OUTPUTS = {
    "scores": "float32 [K]: class score x maskness, sorted descending (K = model.num_detections)",
    "labels": "int64 [K]: class index into metadata isda.class_names (COCO category id: isda.cat_ids[label])",
    "masks": "bool [K, output_height, output_width]: the instance masks",
    "boxes": "float32 [K, 4]: x0, y0, x1, y1 of each mask in pixels (zeros for an empty mask)",
    "query_index": "int64 [K]: the decoder query of each detection",
    "reference_points": "float32 [K, 2]: the detection's query point (x, y) in [0, 1] of the image",
    "query_points": "float32 [Q, 2]: every query's point (x, y) in [0, 1] of the image",
    "query_scores": "float32 [Q]: every query's best class score (sigmoid)",
}


class ExportableISDA(nn.Module):
    """One image in [0, 1] -> the final detections, with graph-friendly pre- and post-processing: the
    model's own :func:`rank_detections`, :meth:`ISDA.upsample_probs` and :func:`mask_boxes`; the batching of
    :meth:`ISDA.batch_images` reduced to one image."""

    def __init__(self, model: ISDA) -> None:
        super().__init__()
        self.model = model
        self.output_resize = OutputResize()

    def forward(self, image: Tensor, output_size: Tensor) -> tuple[Tensor, ...]:
        cfg = self.model.cfg
        h, w = image.shape[-2:]
        div = cfg.size_divisibility
        # Rounded up as (h + div - 1) // div: ONNX integer division truncates, so -(-h // div) would round down.
        pad = (0, (w + div - 1) // div * div - w, 0, (h + div - 1) // div * div - h)
        batch = F.pad((image - self.model.pixel_mean) / self.model.pixel_std, pad)
        mask = F.pad(image.new_zeros(1, h, w), pad, value=1.0) > 0.5  # True = padding
        out = self.model.forward_features(batch, mask)
        logits = out["logits"][-1, 0]
        k = min(cfg.num_detections, logits.numel())
        scores, labels, query, probs = rank_detections(logits, out["mask_logits"][-1, 0], k, cfg.mask_threshold)
        probs = self.model.upsample_probs(probs, (h, w), (h, w))
        masks = self.output_resize(probs, output_size) > cfg.mask_threshold
        points = out["reference_points"][0]
        return (scores, labels, masks, mask_boxes(masks), query, points[query], points,
                logits.sigmoid().amax(-1))


class OutputResize(nn.Module):
    """(K, h, w) mask probabilities at the image's size -> (K, H, W) at ``output_size`` (bilinear, as
    :meth:`ISDA.upsample_probs`). Its own module so that the exported Resize node is found by name
    (:func:`skip_same_size_resize`): a trace cannot record the branch that skips it."""

    def forward(self, probs: Tensor, output_size: Tensor) -> Tensor:
        size = (output_size[0], output_size[1])
        return F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False).flatten(0, 1)


def skip_same_size_resize(graph: "onnx.GraphProto", scope: str = "/output_resize/") -> None:
    """Wrap the output Resize node of ``graph`` (onnx GraphProto, edited in place) in an ``If`` that passes
    its input through when the output size equals the input's: a bilinear resize to the same size is the
    identity (align_corners=False maps every pixel to itself), but ONNX Runtime would compute it."""
    from onnx import TensorProto, helper

    (index,) = [i for i, n in enumerate(graph.node) if n.op_type == "Resize" and n.name.startswith(scope)]
    resize = graph.node[index]
    x, sizes, out = resize.input[0], resize.input[3], resize.output[0]
    rank4 = [None] * 4  # static rank (OpenVINO needs it downstream), dynamic sizes

    def branch(name: str, node: "onnx.NodeProto") -> "onnx.GraphProto":
        return helper.make_graph([node], name, [], [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT,
                                                                                    rank4)])

    same = helper.make_node("Identity", [x], [f"{out}_same"])
    resized = helper.make_node("Resize", list(resize.input), [f"{out}_resized"], name=resize.name)
    resized.attribute.extend(resize.attribute)
    nodes = [
        helper.make_node("Shape", [x], [f"{out}_in_shape"]),
        helper.make_node("Equal", [f"{out}_in_shape", sizes], [f"{out}_equal"]),
        helper.make_node("Cast", [f"{out}_equal"], [f"{out}_equal_int"], to=TensorProto.INT64),
        helper.make_node("ReduceMin", [f"{out}_equal_int"], [f"{out}_all_int"], keepdims=0),
        helper.make_node("Cast", [f"{out}_all_int"], [f"{out}_all"], to=TensorProto.BOOL),
        helper.make_node("If", [f"{out}_all"], [out], name=f"{scope}If",
                         then_branch=branch("same_size", same), else_branch=branch("resize", resized)),
    ]
    del graph.node[index]
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)


@dataclass
class ExportInfo:
    path: Path
    seconds: float
    size_bytes: int
    opset: int


def example_size(model: ISDA, short_side: int) -> tuple[int, int]:
    """A trace-time image size that is no multiple of 32 (the padding is exercised, nothing is special-cased)."""
    h = short_side + 5 if short_side % 32 == 0 else short_side
    return h, h * 4 // 3 + 7


def export_model(model: ISDA, out: str | os.PathLike, metadata: dict[str, str], *, opset: int = OPSET,
                 size: tuple[int, int] = (133, 181)) -> ExportInfo:
    """Trace ``model`` at ``size`` and write the ONNX file (atomically), checked by ``onnx.checker``, with
    ``metadata`` plus the inputs' and outputs' descriptions in its metadata properties."""
    require("onnx")
    import onnx

    if opset < 17:
        raise ValueError(f"opset must be >= 17 (GridSample, LayerNormalization), got {opset}")
    model.eval()
    attn = model.transformer.decoder[-1].cross_attn
    keep = attn.keep_sampling
    attn.keep_sampling = False  # sampling points are not outputs of the graph
    t0 = time.perf_counter()
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The trace warns at every shape-derived Python value; the graph's sizes are checked by the tests.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                ExportableISDA(model).eval(), (torch.rand(1, 3, *size), torch.tensor(size)), buffer, dynamo=False,
                opset_version=opset, input_names=list(INPUTS), output_names=list(OUTPUTS),
                dynamic_axes={"image": {2: "height", 3: "width"},
                              "masks": {1: "output_height", 2: "output_width"}})
    finally:
        attn.keep_sampling = keep
    proto = onnx.load_from_string(buffer.getvalue())
    skip_same_size_resize(proto.graph)
    props = {**metadata, "isda.inputs": json.dumps(INPUTS), "isda.outputs": json.dumps(OUTPUTS)}
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = "ISDA instance segmentation, NMS-free: image -> scores, labels, masks, boxes"
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    atomic_write_bytes(out, data)
    return ExportInfo(Path(out), time.perf_counter() - t0, len(data), opset)


def export_onnx(weights: str | os.PathLike, out: str | os.PathLike, *, opset: int = OPSET,
                size: tuple[int, int] | None = None) -> ExportInfo:
    """An isda checkpoint (``best.pt``) -> ``out`` (.onnx): the graph, and in its metadata the config, class
    names and COCO category ids that ``isda predict/eval --weights model.onnx`` need."""
    require("onnx")
    from ..inference import load_trained_model

    loaded = load_trained_model(weights, "cpu")
    metadata = {**isda_metadata(loaded.cfg, loaded.class_names, loaded.cat_ids), "isda.source": str(weights)}
    size = size or example_size(loaded.model, loaded.cfg.data.test_short_side)
    return export_model(loaded.model, out, metadata, opset=opset, size=size)


def isda_metadata(cfg: Config, class_names: list[str] | None = None, cat_ids: list[int] | None = None
                  ) -> dict[str, str]:
    """What :mod:`isda.deploy.runtime` reads back: the config (its data section sizes the test images), the
    class names and COCO category ids (default: "0", "1", ... and 1, 2, ...)."""
    n = cfg.model.num_classes
    return {"isda.config": json.dumps(cfg.to_dict()),
            "isda.class_names": json.dumps(list(class_names or [str(i) for i in range(n)])),
            "isda.cat_ids": json.dumps(list(cat_ids or range(1, n + 1)))}


def quantize_transformer(src: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """ONNX Runtime dynamic int8 quantisation of the transformer's linear layers (weights int8 per tensor,
    activations quantised at run time); the backbone, mask features and heads stay float. Returns the
    quantised nodes' names. Written atomically."""
    require("onnx", "onnxruntime")
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node
             if n.op_type in ("MatMul", "Gemm") and n.name.startswith("/transformer/")]
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        quantize_dynamic(str(src), str(tmp), op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes,
                         weight_type=QuantType.QInt8)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return nodes
