"""Padding-aware spatial ops: results inside an image do not depend on how much the batch pads it.

Convolutions see zeros outside the valid region (as zero padding would for the image alone);
GroupNorm statistics and bilinear upsampling use valid pixels only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def exporting() -> bool:
    """Whether the model is being traced for ONNX (or torch.export). A trace freezes every Python decision on
    tensor values into the graph, so the model then takes its general, shape-independent paths."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def has_padding(padding_mask: Tensor | None) -> bool:
    """Whether a padding mask marks any pixel as padding (an unpadded batch takes the plain, faster ops).
    While exporting, any mask counts as padded: the masked ops give the plain ops' results on an unpadded
    image, so the graph serves every input size."""
    if padding_mask is None:
        return False
    return exporting() or bool(padding_mask.any())


def valid_of(padding_mask: Tensor) -> Tensor:
    """(B, H, W) bool padding mask (True = pad) -> (B, 1, H, W) float validity."""
    return (~padding_mask).unsqueeze(1).to(torch.float32)


def resize_mask(padding_mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Padding mask at another resolution (nearest: a cell is valid if its top-left pixel is)."""
    return F.interpolate(padding_mask[:, None].float(), size=size, mode="nearest")[:, 0].bool()


def masked_group_norm(x: Tensor, padding_mask: Tensor | None, gn: nn.GroupNorm) -> Tensor:
    """GroupNorm whose statistics cover only valid pixels; padded pixels are zeroed."""
    if not has_padding(padding_mask):
        return gn(x)
    B, C, H, W = x.shape
    valid = valid_of(padding_mask).to(x.dtype)  # (B, 1, H, W)
    g = gn.num_groups
    xg = (x * valid).reshape(B, g, C // g, H * W)  # reshape: x may be channels-last
    vg = valid.view(B, 1, 1, H * W)
    count = vg.sum(-1, keepdim=True).clamp(min=1) * (C // g)
    mean = xg.sum((-1, -2), keepdim=True) / count
    var = (((xg - mean) * vg) ** 2).sum((-1, -2), keepdim=True) / count
    y = ((xg - mean) / torch.sqrt(var + gn.eps)).view(B, C, H, W)
    if gn.affine:
        y = y * gn.weight.view(1, C, 1, 1) + gn.bias.view(1, C, 1, 1)
    return y * valid


def masked_upsample2x(x: Tensor, padding_mask: Tensor | None, out_mask: Tensor | None) -> Tensor:
    """Bilinear 2x upsampling that interpolates valid pixels only (normalized interpolation).

    Inside the image this equals plain bilinear upsampling; at the image border it equals the edge
    clamping the image alone would get, instead of blending in the padding. Without padding it is plain
    bilinear upsampling (the normalization would divide by interpolated ones).
    """
    if not has_padding(padding_mask):
        out = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return out * valid_of(out_mask).to(x.dtype) if has_padding(out_mask) else out
    valid = valid_of(padding_mask).to(x.dtype)
    num = F.interpolate(x * valid, scale_factor=2, mode="bilinear", align_corners=False)
    den = F.interpolate(valid, scale_factor=2, mode="bilinear", align_corners=False)
    out = num / den.clamp(min=1e-6)
    return out * valid_of(out_mask).to(x.dtype) if out_mask is not None else out
