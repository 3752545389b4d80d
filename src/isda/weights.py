"""Initialise ISDA from Deformable-DETR checkpoints (as the paper does) and fine-tune from ISDA checkpoints.

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

What maps: the ResNet backbone; Deformable DETR's four input projections (C3, C4, C5 1x1 conv + GN and
the 3x3 stride-2 conv on C5 + GN) -> our neck's P3..P6 (``neck.lateral.1..3``, ``neck.extra``); level
embeddings, encoder, decoder, query embeddings (first half = query position, second = query content
in every layout, as in ours), the reference-point projection, and the class head when the number of
classes matches (or with ``class_indices``, e.g. :data:`COCO_CATEGORY_IDS` to take a 91-way COCO head to
80 classes). Box heads are not used; ISDA's mask-feature branch, kernel branch and P2 lateral keep their
initialisation. :class:`ConversionReport` lists both.

Files are read with ``torch.load(..., weights_only=True)`` (no pickled code runs) or ``safetensors``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .backbone import WeightsError, to_torchvision_key

if TYPE_CHECKING:
    from .model import ISDA

__all__ = [
    "COCO_CATEGORY_IDS", "FORMATS", "ConversionReport", "Layout", "WeightsError", "convert_state_dict",
    "detect_format", "export_state_dict", "load_pretrained", "read_checkpoint", "save_converted",
]

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
_UNUSED_BN_COUNTER = "BatchNorm step counter (not a weight; this backbone has frozen BatchNorm)"
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


@dataclass
class ConversionReport:
    """What a conversion did. ``loaded``: ISDA key -> the source key(s) it came from; ``unused``: source
    key -> why it was not used; ``left_at_init``: ISDA key -> why it keeps its initialisation."""

    fmt: str
    source: str | None = None
    layout: Layout | None = None
    loaded: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)
    left_at_init: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        src = f" {self.source}" if self.source else ""
        lines = [f"ISDA weights from the {FORMAT_NAMES.get(self.fmt, self.fmt)} checkpoint{src}"]
        groups: dict[str, int] = {}
        for key in self.loaded:
            name = "class head" if key.startswith("head.class_embed.") else key.split(".")[0]
            groups[name] = groups.get(name, 0) + 1
        detail = ", ".join(f"{k} {n}" for k, n in groups.items())
        lines.append(f"  loaded: {len(self.loaded)} tensors" + (f" ({detail})" if detail else ""))
        for title, table in (("left at initialisation", self.left_at_init), ("not used from the checkpoint", self.unused)):
            lines.append(f"  {title}: {len(table)} tensors" + (":" if table else ""))
            for reason, keys in _by_reason(table).items():
                lines.append(f"    {reason}: {_summarize(keys)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Reading files


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict (str -> Tensor) inside a weights file, read without running pickled code.

    ``.safetensors`` files are read with safetensors; everything else with ``torch.load(weights_only=True)``.
    Containers ``{"state_dict": ...}`` (mmdetection), ``{"model": ...}`` (Deformable-DETR, our trainer)
    are unwrapped and a DistributedDataParallel ``module.`` prefix is removed.
    """
    p = Path(path)
    if p.is_dir():  # a Hugging Face model folder
        found = [p / n for n in ("model.safetensors", "pytorch_model.bin") if (p / n).is_file()]
        if not found:
            raise WeightsError(f"{p}: folder without model.safetensors or pytorch_model.bin")
        p = found[0]
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p}")
    if p.name.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise WeightsError(f"{p}: reading .safetensors files needs the 'safetensors' package "
                               "(pip install safetensors)") from None
        try:
            obj = load_file(str(p), device="cpu")
        except Exception as e:  # truncated, not a safetensors file
            raise WeightsError(f"{p}: not a readable safetensors file ({_one_line(e)})") from None
    else:
        obj = _torch_load(p)
    return unwrap_state_dict(obj, str(p))


def _torch_load(p: Path) -> Any:
    # Deformable-DETR checkpoints carry their argparse options ("args"): a harmless plain-attribute class.
    safe = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe is not None:
            with safe([argparse.Namespace]):
                return torch.load(p, map_location="cpu", weights_only=True)
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            raise WeightsError(f"{p}: refused to unpickle the Python object {found.group(1)} (weights are read "
                               "with weights_only=True: only tensors and plain containers are accepted)") from None
        raise WeightsError(f"{p}: not a loadable torch weights file ({_one_line(e)})") from None


def unwrap_state_dict(obj: Any, where: str = "checkpoint") -> dict[str, Tensor]:
    """A checkpoint object -> its state dict (see :func:`read_checkpoint`)."""
    state = None
    if _is_state_dict(obj):
        state = obj
    elif isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if _is_state_dict(obj.get(key)):
                state = obj[key]
                break
    if state is None:
        if isinstance(obj, Mapping):
            shown = ", ".join(repr(k) for k in list(obj)[:6])
            raise WeightsError(f"{where}: no state dict of tensors found (top-level keys: {shown or 'none'})")
        raise WeightsError(f"{where}: expected a state dict, got {type(obj).__name__}")
    state = dict(state)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# ---------------------------------------------------------------------------------------------------------
# Formats and layouts


def normalize_format(fmt: str) -> str:
    name = _ALIASES.get(fmt.lower(), fmt.lower())
    if name not in FORMATS:
        raise WeightsError(f"unknown weights format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return name


def detect_format(state: Mapping[str, Any], where: str = "checkpoint") -> str:
    """'hf', 'detr', 'mmdet' or 'isda' from a state dict's key names; WeightsError if none fits."""
    fmt = _guess_format(state)
    if fmt is not None:
        return fmt
    keys = list(state)
    if "conv1.weight" in state and any(k.startswith("fc.") for k in keys):
        raise WeightsError(f"{where}: looks like a ResNet classifier (conv1.*, fc.*), not a Deformable-DETR or "
                           "ISDA checkpoint; ImageNet backbone weights go to model.backbone_weights")
    shown = ", ".join(keys[:3])
    raise WeightsError(f"{where}: not a Deformable-DETR (hf, detr, mmdet) or ISDA checkpoint "
                       f"(first keys: {shown}); pass the format explicitly if it is one")


def _guess_format(state: Mapping[str, Any]) -> str | None:
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
class _Entry:
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


def _entries(model: ISDA, fmt: str, layout: Layout) -> list[_Entry]:
    """Every ISDA tensor the format provides (class head excluded), with its source key(s)."""
    cfg = model.cfg
    out: list[_Entry] = []

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
        out.append(_Entry("backbone." + key, (src,), "skip" if key.endswith("num_batches_tracked") else None))

    # Input projections -> P3..P6 (our lateral 0 is P2, which Deformable DETR does not have).
    first = len(model.neck.lateral) - 3
    for i in range(4):
        conv, norm = (f"neck.lateral.{first + i}", f"neck.lateral_norm.{first + i}") if i < 3 else ("neck.extra", "neck.extra_norm")
        if fmt == "mmdet":
            base = f"neck.convs.{i}" if i < 3 else "neck.extra_convs.0"
            out.append(_Entry(f"{conv}.weight", (f"{base}.conv.weight",)))
            out.append(_Entry(f"{conv}.bias", (f"{base}.conv.bias",), None if layout.mmdet_neck_bias else "zero"))
            out += [_Entry(f"{norm}.{p}", (f"{base}.gn.{p}",)) for p in ("weight", "bias")]
        else:
            base = ("input_proj" if fmt == "detr" else layout.hf_prefix + "input_proj") + f".{i}"
            out += [_Entry(f"{conv}.{p}", (f"{base}.0.{p}",)) for p in ("weight", "bias")]
            out += [_Entry(f"{norm}.{p}", (f"{base}.1.{p}",)) for p in ("weight", "bias")]

    # Transformer.
    P = layout.hf_prefix
    tr = {"detr": "transformer.", "mmdet": "bbox_head.transformer.", "hf": P}[fmt]
    level = {"detr": "transformer.level_embed", "mmdet": "bbox_head.transformer.level_embeds", "hf": P + "level_embed"}
    query = {"detr": "query_embed.weight", "mmdet": "bbox_head.query_embedding.weight",
             "hf": P + "query_position_embeddings.weight"}
    out.append(_Entry("transformer.level_embed", (level[fmt],)))
    out.append(_Entry("transformer.query_embed.weight", (query[fmt],)))
    out += [_Entry(f"transformer.reference_points.{p}", (f"{tr}reference_points.{p}",)) for p in ("weight", "bias")]

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
            out += [_Entry(f"{ours}{name}.{s}", (f"{theirs}{src}.{s}",)) for s in subs]
    for i in range(cfg.dec_layers):
        ours, theirs = f"transformer.decoder.{i}.", f"{tr}decoder.layers.{i}."
        for p in ("weight", "bias"):
            if fmt == "hf":  # separate q, k, v projections -> nn.MultiheadAttention's packed in_proj (q, k, v order)
                srcs = tuple(f"{theirs}self_attn.{x}_proj.{p}" for x in "qkv")
            else:
                srcs = (f"{theirs}{'self_attn' if fmt == 'detr' else 'attentions.0.attn'}.in_proj_{p}",)
            out.append(_Entry(f"{ours}self_attn.in_proj_{p}", srcs))
        for name, src in dec_names.items():
            subs = [f"{m}.{p}" for m in msda for p in ("weight", "bias")] if name == "cross_attn" else ["weight", "bias"]
            out += [_Entry(f"{ours}{name}.{s}", (f"{theirs}{src}.{s}",)) for s in subs]
    return out


def _class_head_prefix(fmt: str, layout: Layout) -> str | None:
    """Prefix of the per-decoder-layer class heads (``<prefix><j>.weight``), None where the layout has none."""
    if fmt == "detr":
        return "class_embed."
    if fmt == "mmdet":
        return "bbox_head.cls_branches."
    return "class_embed." if layout.hf_prefix else None


def _unused_reason(key: str) -> str:
    if key.endswith("num_batches_tracked"):
        return _UNUSED_BN_COUNTER
    if re.search(r"(^|\.)(bbox_embed|reg_branches)\.", key):
        return _UNUSED_BOX
    return _UNUSED_OTHER


def _init_reason(key: str) -> str:
    if key.startswith("mask_features."):
        return "mask-feature branch (ISDA only)"
    if key.startswith("head.kernel_embed."):
        return "dynamic-kernel branch (ISDA only)"
    if key.startswith(("neck.lateral.0.", "neck.lateral_norm.0.")):
        return "P2 lateral (Deformable DETR's projections start at C3)"
    if key.startswith("transformer.point_refine."):
        return "point refinement (model.refine_points; ISDA only)"
    return "missing from the checkpoint"


# ---------------------------------------------------------------------------------------------------------
# Conversion


def convert_state_dict(src_state: Mapping[str, Any], fmt: str | None, model: ISDA, *,
                       class_indices: Sequence[int] | None = None, strict: bool = True,
                       source: str | None = None) -> ConversionReport:
    """Map a Deformable-DETR (or ISDA) state dict onto ``model`` and load it; returns what was done.

    ``src_state`` may also be a whole checkpoint (``{"model": ...}``, ``{"state_dict": ...}``). ``fmt``:
    'hf' | 'detr' | 'mmdet' | 'isda', or None to detect it from the key names. ``class_indices``: for each
    of the model's classes, the row of the checkpoint's class head to take (e.g. :data:`COCO_CATEGORY_IDS`
    for a 91-way Deformable-DETR COCO head and an 80-class model); without it the class head loads only if
    the class counts match. ``strict``: every tensor the format should provide must be there (else
    WeightsError); with False, what is missing keeps its initialisation and is reported.
    Shape mismatches always raise WeightsError naming the key and both shapes.
    """
    where = source or "checkpoint"
    state = unwrap_state_dict(src_state, where)
    fmt = normalize_format(fmt) if fmt is not None else detect_format(state, where)
    if fmt == "isda":
        return _load_isda(state, model, class_indices=class_indices, strict=strict, source=source)

    _check_unsupported(state, where)
    layout = detect_layout(state, fmt)
    if strict:
        _check_layer_counts(state, fmt, layout, model, where)
    report = ConversionReport(fmt=fmt, source=source, layout=layout)
    own = model.state_dict()
    converted: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[tuple[str, str]] = []
    entries = _entries(model, fmt, layout)
    for e in entries:
        absent = [s for s in e.sources if s not in state]
        if absent:
            if e.optional == "zero":
                converted[e.target] = torch.zeros_like(own[e.target])
                report.loaded[e.target] = ()
            elif e.optional is None:
                missing.append((e.target, absent[0]))
            continue
        parts = [state[s] for s in e.sources]
        tensor = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
        if e.target == "transformer.query_embed.weight":
            tensor = _with_hybrid_queries(tensor, own[e.target], model.cfg.num_queries, report)
        _check_shape(where, e.sources, tensor, e.target, own[e.target])
        converted[e.target] = tensor
        report.loaded[e.target] = e.sources
        used.update(e.sources)

    if missing:
        expected = sum(1 for e in entries if e.optional is None)
        if len(missing) == expected:
            other = _guess_format(state)
            looks = f"; its keys look like the {other!r} format" if other and other != fmt else ""
            raise WeightsError(f"{where}: not a {FORMAT_NAMES[fmt]} checkpoint (none of the {expected} expected "
                               f"keys found, e.g. {missing[0][1]!r}){looks}")
        if strict:
            raise WeightsError(f"{where}: incomplete {FORMAT_NAMES[fmt]} checkpoint for this model: "
                               f"{len(missing)} of {expected} tensors missing, e.g. {missing[0][1]!r} "
                               f"(for {missing[0][0]}); strict=False leaves them at initialisation")
        for target, src in missing:
            report.left_at_init[target] = f"missing from the checkpoint ({src})"

    _convert_class_head(state, fmt, layout, own, converted, used, report, class_indices, where)
    for key in state:
        if key not in used:
            report.unused.setdefault(key, _unused_reason(key))
    if any(e.optional == "zero" and not report.loaded[e.target] for e in entries if e.target in report.loaded):
        report.notes.append("neck conv biases set to zero (mmdetection's convs before GroupNorm have none)")
    if any("decoder.bbox_embed." in k for k in state):
        report.notes.append("the checkpoint was trained with box refinement (per-layer reference points); " + (
            "this model's point refinement (model.refine_points) keeps its initialisation" if model.cfg.refine_points
            else "ISDA keeps each query's reference point fixed"))
    _load_into(model, converted, where)
    for key in own:
        if key not in converted and key not in report.left_at_init and not key.endswith("num_batches_tracked"):
            report.left_at_init[key] = _init_reason(key)
    return report


def _with_hybrid_queries(tensor: Tensor, own: Tensor, num_queries: int, report: ConversionReport) -> Tensor:
    """The checkpoint's queries become the one-to-one queries; the training-only one-to-many queries
    (``model.hybrid_queries``) keep their initialisation, as when H-DETR starts from a DETR checkpoint."""
    if tensor.shape[0] == num_queries < own.shape[0] and tensor.shape[1:] == own.shape[1:]:
        report.notes.append(f"the checkpoint's {num_queries} queries load as the one-to-one queries; the "
                            f"{own.shape[0] - num_queries} one-to-many (hybrid) queries keep their initialisation")
        return torch.cat([tensor, own[num_queries:]])
    return tensor


def _check_shape(where: str, sources: Sequence[str], tensor: Tensor, target: str, own: Tensor) -> None:
    if tuple(tensor.shape) != tuple(own.shape):
        src = sources[0] if len(sources) == 1 else "+".join(sources)
        raise WeightsError(f"{where}: shape mismatch: {src} has shape {tuple(tensor.shape)} in the checkpoint, "
                           f"the model's {target} has {tuple(own.shape)}")


def _check_layer_counts(state: Mapping[str, Tensor], fmt: str, layout: Layout, model: ISDA, where: str) -> None:
    tr = {"detr": "transformer.", "mmdet": "bbox_head.transformer.", "hf": layout.hf_prefix}[fmt]
    for part, ours in (("encoder", model.cfg.enc_layers), ("decoder", model.cfg.dec_layers)):
        pattern = re.compile(re.escape(f"{tr}{part}.layers.") + r"(\d+)\.")
        found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
        if found and len(found) != ours:
            raise WeightsError(f"{where}: the checkpoint has {len(found)} {part} layers, the model {ours} "
                               "(strict=False loads the first ones)")


def _check_unsupported(state: Mapping[str, Tensor], where: str) -> None:
    for key in state:
        if re.search(r"(position_embedding\.(row|column)_embeddings|enc_output|pos_trans)\.", key):
            raise WeightsError(f"{where}: unsupported Deformable-DETR variant (has {key}): ISDA needs sine "
                               "position embeddings and learned queries (not two-stage)")


def _convert_class_head(state, fmt, layout, own, converted, used, report, class_indices, where) -> None:
    prefix = _class_head_prefix(fmt, layout)
    heads = sorted(int(m.group(1)) for k in state
                   if prefix and (m := re.fullmatch(re.escape(prefix) + r"(\d+)\.weight", k)))
    targets = ("head.class_embed.weight", "head.class_embed.bias")
    if not heads:
        for t in targets:
            report.left_at_init[t] = "no class head in the checkpoint"
        return
    keys = {j: (f"{prefix}{j}.weight", f"{prefix}{j}.bias") for j in heads}
    first = keys[heads[0]]
    same = all(all(k in state and torch.equal(state[k], state[f]) for k, f in zip(keys[j], first)) for j in heads)
    # Without box refinement the per-layer heads are one shared module (copies); otherwise take the last layer's.
    pick = heads[0] if same else heads[-1]
    for j in heads:
        if j != pick:
            for k in keys[j]:
                if k in state:
                    report.unused[k] = ("copy of the shared class head " + keys[pick][0].rsplit(".", 1)[0] if same
                                        else "class head of an earlier decoder layer (ISDA shares one class head)")
    w_key, b_key = keys[pick]
    if b_key not in state:
        raise WeightsError(f"{where}: class head {w_key} has no bias {b_key}")
    w, b = state[w_key], state[b_key]
    n_model = own[targets[0]].shape[0]
    if class_indices is not None:
        idx = [int(i) for i in class_indices]
        if len(idx) != n_model:
            raise WeightsError(f"{where}: class_indices has {len(idx)} entries, the model has {n_model} classes")
        if idx and (min(idx) < 0 or max(idx) >= w.shape[0]):
            raise WeightsError(f"{where}: class_indices must lie in [0, {w.shape[0]}) (the checkpoint's "
                               f"{w.shape[0]} classes), got {min(idx)}..{max(idx)}")
        w, b = w[idx], b[idx]
    if w.shape[0] != n_model:
        reason = (f"class count differs: checkpoint {w.shape[0]}, model {n_model} "
                  "(class_indices can pick the checkpoint's rows)")
        for t in targets:
            report.left_at_init[t] = reason
        for k in (w_key, b_key):
            report.unused[k] = reason
        return
    _check_shape(where, (w_key,), w, targets[0], own[targets[0]])
    _check_shape(where, (b_key,), b, targets[1], own[targets[1]])
    converted[targets[0]], converted[targets[1]] = w, b
    report.loaded[targets[0]], report.loaded[targets[1]] = (w_key,), (b_key,)
    used.update((w_key, b_key))
    if class_indices is not None:
        report.notes.append(f"class head: {n_model} of the checkpoint's {state[w_key].shape[0]} classes taken "
                            "by class_indices")


def _load_isda(state: dict[str, Tensor], model: ISDA, *, class_indices, strict: bool,
               source: str | None) -> ConversionReport:
    """An ISDA checkpoint: everything loads; a class head of another size keeps its initialisation."""
    where = source or "checkpoint"
    report = ConversionReport(fmt="isda", source=source)
    own = model.state_dict()
    converted: dict[str, Tensor] = {}
    heads = ("head.class_embed.weight", "head.class_embed.bias")
    if class_indices is not None and all(h in state for h in heads):
        idx = [int(i) for i in class_indices]
        n = state[heads[0]].shape[0]
        if len(idx) != own[heads[0]].shape[0] or (idx and (min(idx) < 0 or max(idx) >= n)):
            raise WeightsError(f"{where}: class_indices must give one of the checkpoint's {n} classes for each "
                               f"of the model's {own[heads[0]].shape[0]} classes")
        state = {**state, **{h: state[h][idx] for h in heads}}
        report.notes.append(f"class head: {len(idx)} of the checkpoint's {n} classes taken by class_indices")
    for key, value in state.items():
        if key not in own:
            report.unused[key] = (_UNUSED_BN_COUNTER if key.endswith("num_batches_tracked")
                                  else "not a tensor of this model")
            continue
        if key in heads and value.shape[1:] == own[key].shape[1:] and value.shape[0] != own[key].shape[0]:
            reason = f"class count differs: checkpoint {value.shape[0]}, model {own[key].shape[0]}"
            report.unused[key] = report.left_at_init[key] = reason
            continue
        _check_shape(where, (key,), value, key, own[key])
        converted[key] = value
        report.loaded[key] = (key,)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if not converted and not any(k in own for k in state):
        other = _guess_format(state)
        looks = f"; its keys look like the {other!r} format" if other and other != "isda" else ""
        raise WeightsError(f"{where}: not an ISDA checkpoint (no key matches this model){looks}")
    if missing and strict:
        raise WeightsError(f"{where}: ISDA checkpoint lacks {len(missing)} of this model's tensors, e.g. "
                           f"{missing[0]!r} (another configuration?); strict=False leaves them at initialisation")
    for key in missing:
        report.left_at_init[key] = "missing from the checkpoint"
    _load_into(model, converted, where)
    return report


def _load_into(model: ISDA, converted: dict[str, Tensor], where: str) -> None:
    with torch.no_grad():
        result = model.load_state_dict(converted, strict=False)
    if result.unexpected_keys:  # cannot happen: every target comes from the model's own state dict
        raise WeightsError(f"{where}: internal error, unexpected keys {result.unexpected_keys[:3]}")


# ---------------------------------------------------------------------------------------------------------
# Export (the inverse mapping of the shared parts)


def export_state_dict(model: ISDA, fmt: str, layout: Layout | None = None, *,
                      include_class_head: bool = True) -> dict[str, Tensor]:
    """The model's shared parts under a format's key names (inverse of :func:`convert_state_dict`).

    For 'hf', ``layout`` picks the variant (default: transformers 5 ``DeformableDetrModel`` with a
    transformers ResNet; ``Layout(hf_prefix="model.")`` adds the class head like
    ``DeformableDetrForObjectDetection``). The class head is written once per decoder layer, as the
    checkpoints store it. ISDA-only parts (mask features, kernel branch, P2 lateral) have no place and are
    left out; so are box heads, which ISDA does not have. 'isda' returns a copy of the state dict.
    """
    fmt = normalize_format(fmt)
    own = model.state_dict()
    if fmt == "isda":
        return {k: v.detach().clone() for k, v in own.items()}
    layout = layout or Layout()
    out: dict[str, Tensor] = {}
    for e in _entries(model, fmt, layout):
        if e.target not in own:
            continue
        value = own[e.target].detach()
        if e.target == "transformer.query_embed.weight":  # the inference queries, not the training-only hybrid ones
            value = value[: model.cfg.num_queries]
        if e.optional == "skip" and fmt != "mmdet":  # BN step counters: only mmdetection's BatchNorm2d has them
            continue
        if e.optional == "zero":  # mmdetection's bias-free conv before GroupNorm
            if bool(value.any()):
                warnings.warn(f"{e.target} is not zero but the {fmt} layout has no such bias: it is dropped",
                              stacklevel=2)
            continue
        if len(e.sources) > 1:
            for s, part in zip(e.sources, value.chunk(len(e.sources), 0)):
                out[s] = part.clone()
        else:
            out[e.sources[0]] = value.clone()
    prefix = _class_head_prefix(fmt, layout)
    if include_class_head and prefix is not None:
        for j in range(model.cfg.dec_layers):
            out[f"{prefix}{j}.weight"] = own["head.class_embed.weight"].detach().clone()
            out[f"{prefix}{j}.bias"] = own["head.class_embed.bias"].detach().clone()
    return out


# ---------------------------------------------------------------------------------------------------------
# Files


def load_pretrained(path: str | os.PathLike, model: ISDA, fmt: str | None = None, *,
                    class_indices: Sequence[int] | None = None, strict: bool = True) -> ConversionReport:
    """Initialise ``model`` from a weights file: a Deformable-DETR checkpoint ('hf', 'detr', 'mmdet') or an
    ISDA checkpoint ('isda', e.g. from :func:`save_converted` or the trainer) — detected from the key names
    unless ``fmt`` is given. Every failure is a one-line WeightsError naming the file. See
    :func:`convert_state_dict` for ``class_indices`` and ``strict``."""
    state = read_checkpoint(path)
    return convert_state_dict(state, fmt, model, class_indices=class_indices, strict=strict, source=str(path))


def save_converted(model_or_state: ISDA | Mapping[str, Tensor], path: str | os.PathLike,
                   report: ConversionReport | None = None) -> Path:
    """Write an ISDA checkpoint that :func:`load_pretrained` (and ``isda train --init``) reads back.

    ``.safetensors`` paths get a safetensors file; anything else a torch file ``{"model": state_dict,
    "meta": {...}}``. The file is written atomically (temp file, then rename).
    """
    from torch import nn

    if isinstance(model_or_state, nn.Module):
        state = model_or_state.state_dict()
        cfg = getattr(model_or_state, "cfg", None)
    else:
        state, cfg = dict(model_or_state), None
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    meta: dict[str, Any] = {"format": "isda", "format_version": 1}
    if report is not None:
        meta.update(source_format=report.fmt, source=report.source or "",
                    left_at_init=sorted(report.left_at_init))
    if cfg is not None and dataclasses.is_dataclass(cfg):
        meta["model_config"] = dataclasses.asdict(cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.name.endswith(".safetensors"):
            try:
                from safetensors.torch import save_file
            except ImportError:
                raise WeightsError(f"{path}: writing .safetensors files needs the 'safetensors' package") from None
            save_file(state, tmp, metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
        else:
            torch.save({"model": state, "meta": meta}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------------------
# Report helpers


def _by_reason(table: Mapping[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, reason in table.items():
        out.setdefault(reason, []).append(key)
    return out


def _summarize(keys: list[str], max_patterns: int = 3) -> str:
    """Compact key list: numbers become '*', leaf names merge into {a,b}; many patterns -> common prefix."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", k), []).append(k)
    patterns: dict[str, int] = {}
    for p, members in groups.items():  # keep a number where every key of the pattern has the same one
        segs = [m.split(".") for m in members]
        p = ".".join(s if s != "*" or len({m[i] for m in segs}) > 1 else segs[0][i] for i, s in enumerate(p.split(".")))
        patterns[p] = len(members)
    merged: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for p, n in patterns.items():
        head, _, leaf = p.rpartition(".")
        merged.setdefault(head, []).append(leaf)
        counts[head] = counts.get(head, 0) + n
    if len(merged) > max_patterns:
        parts = [h.split(".") for h in merged]
        common = []
        for segs in zip(*parts):
            if len(set(segs)) != 1:
                break
            common.append(segs[0])
        return f"{'.'.join(common) + '.' if common else ''}* ({len(keys)})"
    out = []
    for head, leaves in merged.items():
        leaf = leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}"
        out.append(f"{head + '.' if head else ''}{leaf} ({counts[head]})")
    return ", ".join(out)
