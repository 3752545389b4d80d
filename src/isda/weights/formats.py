"""The weights formats ISDA reads and writes: Deformable-DETR's three layouts and ISDA's own.

Three Deformable-DETR layouts are understood (``fmt``):

* ``"hf"``: Hugging Face transformers ``DeformableDetrModel`` / ``DeformableDetrForObjectDetection``
  state dicts (``pytorch_model.bin`` / ``.pth`` / ``model.safetensors``), both the key names of
  transformers 4.x (what hub files hold: ``backbone.conv_encoder.model.*``, ``fc1``, ``self_attn.out_proj``)
  and of transformers 5 (``backbone.model.*``, ``mlp.fc1``, ``self_attn.o_proj``), with a timm or a
  transformers ResNet backbone;
* ``"detr"``: the original fundamentalvision/Deformable-DETR checkpoints (``{"model": state_dict, ...}``);
* ``"mmdet"``: mmdetection 2.x ``DeformableDETR`` checkpoints (``{"meta": ..., "state_dict": ...}``);

plus ``"isda"``: our own checkpoints (a bare state dict or a dict with a ``"model"`` state dict), for
fine-tuning with another number of classes.

This module holds the key tables (which ISDA tensor comes from which source key), format and layout
detection; :mod:`isda.weights.convert` applies them, :mod:`isda.weights.export` inverts them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..models.backbone import to_torchvision_key
from .io import WeightsError

if TYPE_CHECKING:
    from ..models.isda import ISDA

FORMATS = ("hf", "detr", "mmdet", "isda")
FORMAT_NAMES = {"hf": "Hugging Face transformers Deformable-DETR", "detr": "fundamentalvision Deformable-DETR",
                "mmdet": "mmdetection 2.x Deformable-DETR", "isda": "ISDA"}
_ALIASES = {"transformers": "hf", "huggingface": "hf", "deformable-detr": "detr", "deformable_detr": "detr",
            "fundamentalvision": "detr", "mmdetection": "mmdet"}

# The 80 COCO category ids in label order (our labels, mmdetection's): Deformable-DETR's 91-way class
# head (original and Hugging Face) is indexed by category id, so these are its rows for our 80 classes.
COCO_CATEGORY_IDS = (
    tuple(range(1, 12)) + tuple(range(13, 26)) + (27, 28) + tuple(range(31, 45)) + tuple(range(46, 66))
    + (67, 70) + tuple(range(72, 83)) + tuple(range(84, 91))
)

_UNUSED_BOX = "box regression head (ISDA predicts masks, not boxes)"
UNUSED_BN_COUNTER = "BatchNorm step counter (not a weight; this backbone has frozen BatchNorm)"
_UNUSED_OTHER = "no counterpart in ISDA"


@dataclass(frozen=True)
class Layout:
    """Variants of a format's key names (detected from the file; needed again by :func:`export_state_dict`).

    hf_prefix: ``"model."`` for ``DeformableDetrForObjectDetection`` (which also has the class head),
    ``""`` for ``DeformableDetrModel``. hf_timm_backbone: the backbone is a timm ResNet (torchvision key
    names) rather than transformers' ``ResNetBackbone``. hf_legacy_names: transformers 4.x names.
    mmdet_neck_bias: the ChannelMapper convs have biases (mmdetection's default with GN has none).
    """

    hf_prefix: str = ""
    hf_timm_backbone: bool = False
    hf_legacy_names: bool = False
    mmdet_neck_bias: bool = False


def normalize_format(fmt: str) -> str:
    name = _ALIASES.get(fmt.lower(), fmt.lower())
    if name not in FORMATS:
        raise WeightsError(f"unknown weights format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return name


def detect_format(state: Mapping[str, Any], where: str = "checkpoint") -> str:
    """'hf', 'detr', 'mmdet' or 'isda' from a state dict's key names; WeightsError if none fits."""
    fmt = guess_format(state)
    if fmt is not None:
        return fmt
    keys = list(state)
    if "conv1.weight" in state and any(k.startswith("fc.") for k in keys):
        raise WeightsError(f"{where}: looks like a ResNet classifier (conv1.*, fc.*), not a Deformable-DETR or "
                           "ISDA checkpoint; ImageNet backbone weights go to model.backbone_weights")
    shown = ", ".join(keys[:3])
    raise WeightsError(f"{where}: not a Deformable-DETR (hf, detr, mmdet) or ISDA checkpoint "
                       f"(first keys: {shown}); pass the format explicitly if it is one")


def guess_format(state: Mapping[str, Any]) -> str | None:
    keys = list(state)

    def has(pred) -> bool:
        return any(pred(k) for k in keys)

    # ISDA's own names first: Deformable-DETR's "transformer.level_embed" is also ours.
    if has(lambda k: k.startswith(("neck.lateral.", "mask_features.", "head.kernel_embed.", "transformer.query_embed."))
           or re.match(r"transformer\.(en|de)coder\.\d+\.", k)):
        return "isda"
    if has(lambda k: k.startswith(("bbox_head.transformer.", "neck.convs.", "neck.extra_convs."))):
        return "mmdet"
    if has(lambda k: k.startswith(("transformer.encoder.layers.", "transformer.decoder.layers.", "backbone.0.body."))
           or k == "transformer.level_embed"):
        return "detr"
    if has(lambda k: k.endswith("query_position_embeddings.weight") or ".self_attn_layer_norm." in k
           or ".encoder_attn." in k or "backbone.conv_encoder." in k):
        return "hf"
    return None


def detect_layout(state: Mapping[str, Any], fmt: str) -> Layout:
    keys = list(state)
    if fmt == "hf":
        prefix = "model." if any(k.startswith("model.") for k in keys) else ""
        legacy = any("backbone.conv_encoder." in k or re.search(r"\.layers\.\d+\.fc1\.", k)
                     or ".self_attn.out_proj." in k for k in keys)
        timm = any(k.endswith(("backbone.conv_encoder.model.conv1.weight", "backbone.model.conv1.weight")) for k in keys)
        return Layout(hf_prefix=prefix, hf_timm_backbone=timm, hf_legacy_names=legacy)
    if fmt == "mmdet":
        return Layout(mmdet_neck_bias="neck.convs.0.conv.bias" in state)
    return Layout()


@dataclass(frozen=True)
class Entry:
    target: str  # ISDA key
    sources: tuple[str, ...]  # several: concatenated along dim 0 (q, k, v projections)
    optional: str | None = None  # "zero": absent means zeros; "skip": absent is fine (BN counters)


def _hf_resnet_key(tv: str) -> str:
    """torchvision ResNet key -> transformers ResNetBackbone key."""
    if tv.startswith(("conv1.", "bn1.")):
        kind = "convolution" if tv.startswith("conv1.") else "normalization"
        return f"embedder.embedder.{kind}.{tv.split('.', 1)[1]}"
    m = re.fullmatch(r"layer(\d+)\.(\d+)\.(conv|bn)(\d+)\.(.+)", tv)
    if m:
        stage, block, kind, j, rest = m.groups()
        kind = "convolution" if kind == "conv" else "normalization"
        return f"encoder.stages.{int(stage) - 1}.layers.{block}.layer.{int(j) - 1}.{kind}.{rest}"
    m = re.fullmatch(r"layer(\d+)\.(\d+)\.downsample\.([01])\.(.+)", tv)
    if m:
        stage, block, j, rest = m.groups()
        kind = "convolution" if j == "0" else "normalization"
        return f"encoder.stages.{int(stage) - 1}.layers.{block}.shortcut.{kind}.{rest}"
    raise WeightsError(f"no transformers ResNet key for backbone key {tv!r}")


def key_table(model: ISDA, fmt: str, layout: Layout) -> list[Entry]:
    """Every ISDA tensor the format provides (class head excluded), with its source key(s)."""
    cfg = model.cfg
    out: list[Entry] = []

    # Backbone (torchvision layout, our stem grouped as stem.0 / stem.1).
    hf_base = layout.hf_prefix + ("backbone.conv_encoder.model." if layout.hf_legacy_names else "backbone.model.")
    for key in model.backbone.state_dict():
        tv = to_torchvision_key(key)
        if fmt == "detr":
            src = "backbone.0.body." + tv
        elif fmt == "mmdet":
            src = "backbone." + tv
        else:
            src = hf_base + (tv if layout.hf_timm_backbone else _hf_resnet_key(tv))
        out.append(Entry("backbone." + key, (src,), "skip" if key.endswith("num_batches_tracked") else None))

    # Input projections -> P3..P6 (our lateral 0 is P2, which Deformable DETR does not have).
    first = len(model.neck.lateral) - 3
    for i in range(4):
        conv, norm = (f"neck.lateral.{first + i}", f"neck.lateral_norm.{first + i}") if i < 3 else ("neck.extra", "neck.extra_norm")
        if fmt == "mmdet":
            base = f"neck.convs.{i}" if i < 3 else "neck.extra_convs.0"
            out.append(Entry(f"{conv}.weight", (f"{base}.conv.weight",)))
            out.append(Entry(f"{conv}.bias", (f"{base}.conv.bias",), None if layout.mmdet_neck_bias else "zero"))
            out += [Entry(f"{norm}.{p}", (f"{base}.gn.{p}",)) for p in ("weight", "bias")]
        else:
            base = ("input_proj" if fmt == "detr" else layout.hf_prefix + "input_proj") + f".{i}"
            out += [Entry(f"{conv}.{p}", (f"{base}.0.{p}",)) for p in ("weight", "bias")]
            out += [Entry(f"{norm}.{p}", (f"{base}.1.{p}",)) for p in ("weight", "bias")]

    # Transformer.
    P = layout.hf_prefix
    tr = {"detr": "transformer.", "mmdet": "bbox_head.transformer.", "hf": P}[fmt]
    level = {"detr": "transformer.level_embed", "mmdet": "bbox_head.transformer.level_embeds", "hf": P + "level_embed"}
    query = {"detr": "query_embed.weight", "mmdet": "bbox_head.query_embedding.weight",
             "hf": P + "query_position_embeddings.weight"}
    out.append(Entry("transformer.level_embed", (level[fmt],)))
    out.append(Entry("transformer.query_embed.weight", (query[fmt],)))
    out += [Entry(f"transformer.reference_points.{p}", (f"{tr}reference_points.{p}",)) for p in ("weight", "bias")]

    msda = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
    fc1, fc2 = ("fc1", "fc2") if layout.hf_legacy_names else ("mlp.fc1", "mlp.fc2")
    # Our name -> the source's, per layer type. Deformable-DETR's decoder: norm2 follows the self-attention,
    # norm1 the cross-attention; mmcv's norms are numbered in operation order.
    enc_names = {
        "detr": {"self_attn": "self_attn", "norm": "norm1", "ffn.linear1": "linear1", "ffn.linear2": "linear2",
                 "ffn.norm": "norm2"},
        "hf": {"self_attn": "self_attn", "norm": "self_attn_layer_norm", "ffn.linear1": fc1, "ffn.linear2": fc2,
               "ffn.norm": "final_layer_norm"},
        "mmdet": {"self_attn": "attentions.0", "norm": "norms.0", "ffn.linear1": "ffns.0.layers.0.0",
                  "ffn.linear2": "ffns.0.layers.1", "ffn.norm": "norms.1"},
    }[fmt]
    hf_out = "self_attn.out_proj" if layout.hf_legacy_names else "self_attn.o_proj"
    dec_names = {
        "detr": {"self_attn.out_proj": "self_attn.out_proj", "norm1": "norm2", "cross_attn": "cross_attn",
                 "norm2": "norm1", "ffn.linear1": "linear1", "ffn.linear2": "linear2", "ffn.norm": "norm3"},
        "hf": {"self_attn.out_proj": hf_out, "norm1": "self_attn_layer_norm", "cross_attn": "encoder_attn",
               "norm2": "encoder_attn_layer_norm", "ffn.linear1": fc1, "ffn.linear2": fc2,
               "ffn.norm": "final_layer_norm"},
        "mmdet": {"self_attn.out_proj": "attentions.0.attn.out_proj", "norm1": "norms.0", "cross_attn": "attentions.1",
                  "norm2": "norms.1", "ffn.linear1": "ffns.0.layers.0.0", "ffn.linear2": "ffns.0.layers.1",
                  "ffn.norm": "norms.2"},
    }[fmt]
    for i in range(cfg.enc_layers):
        ours, theirs = f"transformer.encoder.{i}.", f"{tr}encoder.layers.{i}."
        for name, src in enc_names.items():
            subs = [f"{m}.{p}" for m in msda for p in ("weight", "bias")] if name == "self_attn" else ["weight", "bias"]
            out += [Entry(f"{ours}{name}.{s}", (f"{theirs}{src}.{s}",)) for s in subs]
    for i in range(cfg.dec_layers):
        ours, theirs = f"transformer.decoder.{i}.", f"{tr}decoder.layers.{i}."
        for p in ("weight", "bias"):
            if fmt == "hf":  # separate q, k, v projections -> nn.MultiheadAttention's packed in_proj (q, k, v order)
                srcs = tuple(f"{theirs}self_attn.{x}_proj.{p}" for x in "qkv")
            else:
                srcs = (f"{theirs}{'self_attn' if fmt == 'detr' else 'attentions.0.attn'}.in_proj_{p}",)
            out.append(Entry(f"{ours}self_attn.in_proj_{p}", srcs))
        for name, src in dec_names.items():
            subs = [f"{m}.{p}" for m in msda for p in ("weight", "bias")] if name == "cross_attn" else ["weight", "bias"]
            out += [Entry(f"{ours}{name}.{s}", (f"{theirs}{src}.{s}",)) for s in subs]
    return out


def class_head_prefix(fmt: str, layout: Layout) -> str | None:
    """Prefix of the per-decoder-layer class heads (``<prefix><j>.weight``), None where the layout has none."""
    if fmt == "detr":
        return "class_embed."
    if fmt == "mmdet":
        return "bbox_head.cls_branches."
    return "class_embed." if layout.hf_prefix else None


def unused_reason(key: str) -> str:
    if key.endswith("num_batches_tracked"):
        return UNUSED_BN_COUNTER
    if re.search(r"(^|\.)(bbox_embed|reg_branches)\.", key):
        return _UNUSED_BOX
    return _UNUSED_OTHER


def init_reason(key: str) -> str:
    if key.startswith("mask_features."):
        return "mask-feature branch (ISDA only)"
    if key.startswith("head.kernel_embed."):
        return "dynamic-kernel branch (ISDA only)"
    if key.startswith(("neck.lateral.0.", "neck.lateral_norm.0.")):
        return "P2 lateral (Deformable DETR's projections start at C3)"
    if key.startswith("transformer.point_refine."):
        return "point refinement (model.refine_points; ISDA only)"
    if key.startswith("dense_aux."):
        return "dense auxiliary head (model.dense_aux, training only; ISDA only)"
    return "missing from the checkpoint"
