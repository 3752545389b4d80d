"""ISDA weights out: under a Deformable-DETR format's key names (the inverse of the conversion's tables)
and as ISDA checkpoint files that ``load_pretrained`` reads back."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .formats import Layout, class_head_prefix, key_table, normalize_format
from .io import WeightsError
from .report import ConversionReport

if TYPE_CHECKING:
    from ..models.isda import ISDA


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
    for e in key_table(model, fmt, layout):
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
    prefix = class_head_prefix(fmt, layout)
    if include_class_head and prefix is not None:
        for j in range(model.cfg.dec_layers):
            out[f"{prefix}{j}.weight"] = own["head.class_embed.weight"].detach().clone()
            out[f"{prefix}{j}.bias"] = own["head.class_embed.bias"].detach().clone()
    return out


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
