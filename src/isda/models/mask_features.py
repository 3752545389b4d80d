"""Mask feature representation (MFR, SOLOv2-style): P2..P5 fused at the mask stride, with coordinates."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .masked_ops import has_padding, masked_group_norm, masked_upsample2x, valid_of


class ConvGNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.norm = nn.GroupNorm(32, cout)

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        if has_padding(padding_mask):
            x = x * valid_of(padding_mask).to(x.dtype)  # the padded area looks like zero padding
        return torch.relu_(masked_group_norm(self.conv(x), padding_mask, self.norm))


def coordinate_map(padding_mask: Tensor) -> Tensor:
    """(B, H, W) -> (B, 2, H, W) pixel-centre coordinates (x, y) in [-1, 1] over each image's valid area."""
    valid = ~padding_mask
    h = valid[:, :, 0].sum(1).clamp(min=1).float().view(-1, 1, 1)
    w = valid[:, 0, :].sum(1).clamp(min=1).float().view(-1, 1, 1)
    H, W = padding_mask.shape[-2:]
    ys = torch.arange(H, device=padding_mask.device, dtype=torch.float32).view(1, H, 1) + 0.5
    xs = torch.arange(W, device=padding_mask.device, dtype=torch.float32).view(1, 1, W) + 0.5
    return torch.stack([(2 * xs / w - 1).expand(-1, H, -1), (2 * ys / h - 1).expand(-1, -1, W)], 1)


def locality_channels(padding_mask: Tensor, stride: int, unit_px: float) -> Tensor:
    """(B, H, W) at ``stride`` -> (B, 4, H, W): each cell's centre x, y in pixels / ``unit_px`` (from the image's
    top-left corner, where every image of a padded batch starts), x^2 + y^2 and 1: the channels that
    ``model.mask_locality``'s kernel weights (:func:`isda.models.head.locality_kernels`) read."""
    B, H, W = padding_mask.shape
    ys = ((torch.arange(H, device=padding_mask.device, dtype=torch.float32) + 0.5) * (stride / unit_px)).view(1, 1, H, 1)
    xs = ((torch.arange(W, device=padding_mask.device, dtype=torch.float32) + 0.5) * (stride / unit_px)).view(1, 1, 1, W)
    xy = torch.cat([xs.expand(B, 1, H, W), ys.expand(B, 1, H, W)], 1)
    return torch.cat([xy, (xy * xy).sum(1, keepdim=True), torch.ones_like(xy[:, :1])], 1)


class MaskFeatures(nn.Module):
    """For each level with stride >= mask_stride: conv-GN-ReLU(-2x upsample) stages down to mask_stride;
    the 1/32 level gets coordinates first (MP); sum; 1x1 conv to out_channels + GN + ReLU."""

    def __init__(self, in_channels: int, feat_channels: int, out_channels: int, mask_stride: int,
                 mask_position: bool, level_strides: tuple[int, ...] = (4, 8, 16, 32)) -> None:
        super().__init__()
        self.mask_position = mask_position
        self.levels = [i for i, s in enumerate(level_strides) if s >= mask_stride]
        self.coord_level = len(level_strides) - 1  # the 1/32 map
        self.branches = nn.ModuleList()
        for i in self.levels:
            stages = max(int(math.log2(level_strides[i] // mask_stride)), 1)
            cin = in_channels + (2 if mask_position and i == self.coord_level else 0)
            convs = [ConvGNReLU(cin if s == 0 else feat_channels, feat_channels, 3) for s in range(stages)]
            self.branches.append(nn.ModuleList(convs))
        self.upsamples = [int(math.log2(level_strides[i] // mask_stride)) for i in self.levels]
        self.fuse = ConvGNReLU(feat_channels, out_channels, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As the official mask feature head's ``init_weights``: every convolution normal(0, 0.01) (no biases:
        GroupNorm follows), GroupNorm weight 1, bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor], masks: list[Tensor], out_mask: Tensor) -> Tensor:
        """feats/masks: P2..P5 and their padding masks; out_mask: padding mask at the mask stride."""
        total = None
        for i, convs, ups in zip(self.levels, self.branches, self.upsamples):
            x, m = feats[i], masks[i]
            if self.mask_position and i == self.coord_level:
                x = torch.cat([x, coordinate_map(m).to(x.dtype)], 1)
            for s, conv in enumerate(convs):
                x = conv(x, m)
                if s < ups:  # each conv stage of a coarser level ends with a 2x upsample
                    up_mask = out_mask if x.shape[-1] * 2 == out_mask.shape[-1] else _half(out_mask, x.shape[-1] * 2)
                    x, m = masked_upsample2x(x, m, up_mask), up_mask
            total = x if total is None else total + x
        return self.fuse(total, out_mask)


def _half(mask: Tensor, width: int) -> Tensor:
    """Padding mask at an intermediate resolution (the mask-stride mask subsampled by a power of 2)."""
    step = mask.shape[-1] // width
    return mask[:, ::step, ::step]
