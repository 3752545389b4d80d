"""Initialise ISDA from Deformable-DETR checkpoints (as the paper does) and fine-tune from ISDA checkpoints.

What maps: the ResNet backbone; Deformable DETR's four input projections (C3, C4, C5 1x1 conv + GN and
the 3x3 stride-2 conv on C5 + GN) -> our neck's P3..P6 (``neck.lateral.1..3``, ``neck.extra``); level
embeddings, encoder, decoder, query embeddings (first half = query position, second = query content
in every layout, as in ours), the reference-point projection, and the class head when the number of
classes matches (or with ``class_indices``, e.g. :data:`COCO_CATEGORY_IDS` to take a 91-way COCO head to
80 classes). Box heads are not used; ISDA's mask-feature branch, kernel branch and P2 lateral keep their
initialisation. :class:`ConversionReport` lists both.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .formats import (
    FORMAT_NAMES,
    UNUSED_BN_COUNTER,
    Layout,
    class_head_prefix,
    key_table,
    init_reason,
    unused_reason,
    detect_format,
    detect_layout,
    guess_format,
    normalize_format,
)
from .io import WeightsError, read_checkpoint, unwrap_state_dict
from .report import ConversionReport

if TYPE_CHECKING:
    from ..models.isda import ISDA


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
    entries = key_table(model, fmt, layout)
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
            other = guess_format(state)
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
            report.unused.setdefault(key, unused_reason(key))
    if any(e.optional == "zero" and not report.loaded[e.target] for e in entries if e.target in report.loaded):
        report.notes.append("neck conv biases set to zero (mmdetection's convs before GroupNorm have none)")
    if any("decoder.bbox_embed." in k for k in state):
        report.notes.append("the checkpoint was trained with box refinement (per-layer reference points); " + (
            "this model's point refinement (model.refine_points) keeps its initialisation" if model.cfg.refine_points
            else "ISDA keeps each query's reference point fixed"))
    _load_into(model, converted, where)
    for key in own:
        if key not in converted and key not in report.left_at_init and not key.endswith("num_batches_tracked"):
            report.left_at_init[key] = init_reason(key)
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
    prefix = class_head_prefix(fmt, layout)
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


# Tensors with one row per class: they follow class_indices, and keep their initialisation when the class count
# differs (fine-tuning on other data).
CLASS_ROWS = ("head.class_embed.weight", "head.class_embed.bias", "head.mask_class.weight", "head.mask_class.bias",
              "denoising.label_embed.weight", "dense_aux.head.class_embed.weight", "dense_aux.head.class_embed.bias")
# Opt-in modules a checkpoint of the plain model lacks; starting them at initialisation is how they train anyway:
# query denoising and the dense auxiliary head are training-only, the mask-pooled classifier starts at zero (the
# paper head's output) and the mask locality at its initial sharpness.
OPTIONAL_MODULES = {"denoising.": "query denoising (training only)", "head.mask_class.": "mask-pooled classifier",
                    "head.locality.": "mask locality", "dense_aux.": "dense auxiliary head (training only)"}


def _load_isda(state: dict[str, Tensor], model: ISDA, *, class_indices, strict: bool,
               source: str | None) -> ConversionReport:
    """An ISDA checkpoint: everything loads; class rows of another count keep their initialisation, and so do
    the opt-in modules (:data:`OPTIONAL_MODULES`) the checkpoint was trained without."""
    where = source or "checkpoint"
    report = ConversionReport(fmt="isda", source=source)
    own = model.state_dict()
    converted: dict[str, Tensor] = {}
    rows = [k for k in CLASS_ROWS if k in state and k in own]
    if class_indices is not None and "head.class_embed.weight" in rows:
        idx = [int(i) for i in class_indices]
        n = state["head.class_embed.weight"].shape[0]
        want = own["head.class_embed.weight"].shape[0]
        if len(idx) != want or (idx and (min(idx) < 0 or max(idx) >= n)):
            raise WeightsError(f"{where}: class_indices must give one of the checkpoint's {n} classes for each "
                               f"of the model's {want} classes")
        state = {**state, **{k: state[k][idx] for k in rows}}
        report.notes.append(f"class rows ({', '.join(rows)}): {len(idx)} of the checkpoint's {n} classes taken "
                            f"by class_indices")
    for key, value in state.items():
        if key not in own:
            report.unused[key] = (UNUSED_BN_COUNTER if key.endswith("num_batches_tracked")
                                  else "not a tensor of this model")
            continue
        if key in rows and value.shape[1:] == own[key].shape[1:] and value.shape[0] != own[key].shape[0]:
            reason = f"class count differs: checkpoint {value.shape[0]}, model {own[key].shape[0]}"
            report.unused[key] = report.left_at_init[key] = reason
            continue
        _check_shape(where, (key,), value, key, own[key])
        converted[key] = value
        report.loaded[key] = (key,)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    optional = {k: f"missing from the checkpoint: {what}, opt-in" for k in missing
                for prefix, what in OPTIONAL_MODULES.items() if k.startswith(prefix)}
    missing = [k for k in missing if k not in optional]
    if not converted and not any(k in own for k in state):
        other = guess_format(state)
        looks = f"; its keys look like the {other!r} format" if other and other != "isda" else ""
        raise WeightsError(f"{where}: not an ISDA checkpoint (no key matches this model){looks}")
    if missing and strict:
        raise WeightsError(f"{where}: ISDA checkpoint lacks {len(missing)} of this model's tensors, e.g. "
                           f"{missing[0]!r} (another configuration?); strict=False leaves them at initialisation")
    report.left_at_init.update(optional)
    for key in missing:
        report.left_at_init[key] = "missing from the checkpoint"
    _load_into(model, converted, where)
    return report


def _load_into(model: ISDA, converted: dict[str, Tensor], where: str) -> None:
    with torch.no_grad():
        result = model.load_state_dict(converted, strict=False)
    if result.unexpected_keys:  # cannot happen: every target comes from the model's own state dict
        raise WeightsError(f"{where}: internal error, unexpected keys {result.unexpected_keys[:3]}")


def load_pretrained(path: str | os.PathLike, model: ISDA, fmt: str | None = None, *,
                    class_indices: Sequence[int] | None = None, strict: bool = True) -> ConversionReport:
    """Initialise ``model`` from a weights file: a Deformable-DETR checkpoint ('hf', 'detr', 'mmdet') or an
    ISDA checkpoint ('isda', e.g. from :func:`save_converted` or the trainer) — detected from the key names
    unless ``fmt`` is given. Every failure is a one-line WeightsError naming the file. See
    :func:`convert_state_dict` for ``class_indices`` and ``strict``."""
    state = read_checkpoint(path)
    return convert_state_dict(state, fmt, model, class_indices=class_indices, strict=strict, source=str(path))
