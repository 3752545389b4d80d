"""The straightforward implementations ISDA had before the CPU optimisations, kept for two uses:
the per-change before/after timings of ``docs/benchmarks.md`` (:mod:`benchmarks.bench_changes`) and the
tests that prove the optimised code computes the same thing (tests/test_benchmarks.py).

:func:`reverted` swaps them in (monkeypatching, restored on exit), one named change at a time.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import FrozenBatchNorm2d, masks_to_boxes

import isda.models.backbone
import isda.models.deformable_attention
import isda.models.mask_features
import isda.models.isda
import isda.models.neck
import isda.models.transformer
from isda.models.masked_ops import masked_group_norm, resize_mask, valid_of
from isda.ops import ms_deform_attn


# ---- change "msda_gather": the deformable attention core -------------------------------------------

grid_sample_ms_deform_attn = functools.partial(ms_deform_attn, impl="grid_sample")


# ---- change "msda_pixel_path": the attention module feeds the core pixel positions --------------------

def msda_forward(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Tensor,
                 value_padding_mask: Tensor | None = None) -> Tensor:
    B, S, C = value.shape
    v = self.value_proj(value)
    if value_padding_mask is not None:
        v = v.masked_fill(value_padding_mask[..., None], 0.0)
    v = v.view(B, S, self.num_heads, C // self.num_heads)
    locations, weights = self.sample(query, reference_points, spatial_shapes)
    if self.keep_sampling:
        self.last_sampling = (locations.detach(), weights.detach())
    with torch.autocast(device_type=query.device.type, enabled=False):
        # Looked up at call time: the "msda_gather" switch patches this module attribute.
        out = isda.models.deformable_attention.ms_deform_attn(v.float(), spatial_shapes, locations.float(), weights.float())
    return self.output_proj(out.to(query.dtype))


# ---- change "unpadded_fast_path": masking ops that always masked, padding or not ------------------

def masked_upsample2x(x: Tensor, padding_mask: Tensor | None, out_mask: Tensor | None) -> Tensor:
    if padding_mask is None:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    valid = valid_of(padding_mask).to(x.dtype)
    num = F.interpolate(x * valid, scale_factor=2, mode="bilinear", align_corners=False)
    den = F.interpolate(valid, scale_factor=2, mode="bilinear", align_corners=False)
    out = num / den.clamp(min=1e-6)
    return out * valid_of(out_mask).to(x.dtype) if out_mask is not None else out


def conv_gn_relu_forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
    x = x * valid_of(padding_mask).to(x.dtype)
    return torch.relu(masked_group_norm(self.conv(x), padding_mask, self.norm))


def neck_forward(self, feats: list[Tensor], padding_mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    masks = [resize_mask(padding_mask, f.shape[-2:]) for f in feats]
    outs = [masked_group_norm(conv(f), m, gn) for f, m, conv, gn in zip(feats, masks, self.lateral, self.lateral_norm)]
    c5 = feats[-1] * valid_of(masks[-1]).to(feats[-1].dtype)
    p6 = self.extra(c5)
    m6 = resize_mask(padding_mask, p6.shape[-2:])
    outs.append(masked_group_norm(p6, m6, self.extra_norm))
    return outs, masks + [m6]


# ---- change "channels_last": the batch (hence every feature map) in channels-last layout on CPU -----

def batch_images(self, images: list[Tensor]) -> tuple[Tensor, Tensor]:
    isda.models.isda._check_images(images)
    div = self.cfg.size_divisibility
    H = -(-max(im.shape[1] for im in images) // div) * div
    W = -(-max(im.shape[2] for im in images) // div) * div
    batch = images[0].new_zeros(len(images), 3, H, W)
    mask = torch.ones(len(images), H, W, dtype=torch.bool, device=images[0].device)
    for i, im in enumerate(images):
        h, w = im.shape[1:]
        batch[i, :, :h, :w] = (im - self.pixel_mean) / self.pixel_std
        mask[i, :h, :w] = False
    return batch, mask


# ---- change "postprocess": full-size masks and their boxes ---------------------------------------

def upsample_masks(self, probs: Tensor, image_size: tuple[int, int], output_size: tuple[int, int],
                   chunk: int = 25) -> Tensor:
    h, w = image_size
    out = torch.empty((probs.shape[0], *output_size), dtype=torch.bool, device=probs.device)
    for i in range(0, probs.shape[0], chunk):
        p = F.interpolate(probs[i : i + chunk, None], scale_factor=self.cfg.mask_stride, mode="bilinear",
                          align_corners=False)[:, :, :h, :w]
        if (h, w) != tuple(output_size):
            p = F.interpolate(p, size=output_size, mode="bilinear", align_corners=False)
        out[i : i + chunk] = p[:, 0] > self.cfg.mask_threshold
    return out


def boxes(masks: Tensor) -> Tensor:
    out = torch.zeros(masks.shape[0], 4, device=masks.device)
    nonempty = masks.flatten(1).any(1)
    if bool(nonempty.any()):
        out[nonempty] = masks_to_boxes(masks[nonempty]).float()
    return out


# ---- change "frozen_bn_fold": the backbone's frozen BatchNorm as its own two passes over the activations ---

frozen_bn_conv_forward = torch.nn.Conv2d.forward
folded_bn_forward = FrozenBatchNorm2d.forward


# ---- change "ffn_inplace_relu": the FFN's ReLU writes a second tokens x ffn_dim tensor -------------------

def ffn_forward(self, x: Tensor) -> Tensor:
    return self.norm(x + self.dropout2(self.linear2(self.dropout1(torch.relu(self.linear1(x))))))


# ---- switching -----------------------------------------------------------------------------------

# change name -> [(object, attribute, baseline value)], in the order the changes were made.
CHANGES: dict[str, list[tuple[object, str, object]]] = {
    "msda_gather": [(isda.models.deformable_attention, "ms_deform_attn", grid_sample_ms_deform_attn)],
    "msda_pixel_path": [(isda.models.deformable_attention.MSDeformAttn, "forward", msda_forward)],
    "decoder_project_after": [(isda.models.deformable_attention.MSDeformAttn, "auto_project_after", False)],
    "unpadded_fast_path": [(isda.models.mask_features, "masked_upsample2x", masked_upsample2x),
                           (isda.models.mask_features.ConvGNReLU, "forward", conv_gn_relu_forward),
                           (isda.models.neck.Neck, "forward", neck_forward)],
    "channels_last": [(isda.models.isda.ISDA, "batch_images", batch_images)],
    "postprocess": [(isda.models.isda.ISDA, "upsample_masks", upsample_masks), (isda.models.isda, "_boxes", boxes)],
    "matched_mask_grads": [(isda.models.isda.ISDA, "matched_mask_grads", False)],
    "frozen_bn_fold": [(isda.models.backbone.FrozenBNConv2d, "forward", frozen_bn_conv_forward),
                       (isda.models.backbone.FoldedFrozenBatchNorm2d, "forward", folded_bn_forward)],
    "ffn_inplace_relu": [(isda.models.transformer.FFN, "forward", ffn_forward)],
}

DESCRIPTIONS = {
    "msda_gather": "deformable attention core as one weighted gather (embedding_bag) over a channels-last, "
                   "zero-bordered value table, hand-written backward (was: grid_sample per level, heads in the "
                   "batch, sampled x weights summed per level)",
    "msda_pixel_path": "the attention module hands the core pixel positions (reference x size + offset) instead "
                       "of normalizing the offsets for the core to multiply back, and skips the value masking "
                       "when nothing is padded",
    "decoder_project_after": "the decoder's cross-attention (300 queries on 20k tokens) samples the input map and "
                             "applies value_proj to the samples only, instead of projecting all 20k tokens "
                             "(value_proj is linear; its bias is weighted by the in-map sample weights)",
    "unpadded_fast_path": "masked ops skip the validity multiplications and the normalized (two-interpolation) "
                          "upsampling when the batch has no padding",
    "channels_last": "in CPU inference the batch is channels-last, so the backbone, neck and mask-feature "
                     "convolutions run (and stay) in oneDNN's preferred layout (training keeps NCHW: no gain measured)",
    "postprocess": "masks upsampled 8 at a time (was 25: cache-sized float temporaries) and thresholded straight "
                   "into the output; boxes from row/column projections instead of torchvision masks_to_boxes "
                   "(a nonzero() per mask)",
    "matched_mask_grads": "training computes every query's masks (for the matcher) without autograd and the matched "
                          "ones again with it: the mask losses see matched queries only (was: backward through the "
                          "masks of all layers x images x queries, two GEMMs over rows of zero gradient)",
    "frozen_bn_fold": "the backbone's frozen BatchNorm folded into the convolution before it, at every call (was: "
                      "torchvision FrozenBatchNorm2d, x * scale + bias: two passes over every activation forward, "
                      "one backward)",
    "ffn_inplace_relu": "without autograd (inference), the transformer FFN's ReLU in place on the first linear's "
                        "output (was: a second tokens x 1024 tensor written per layer)",
}


@contextlib.contextmanager
def reverted(changes: Iterable[str]) -> Iterator[None]:
    """Within the block, the named changes are undone (the baseline implementations are patched in)."""
    saved = []
    try:
        for name in changes:
            for obj, attr, value in CHANGES[name]:
                saved.append((obj, attr, getattr(obj, attr)))
                setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)
