"""Neck ("channel mapper", Deformable DETR's input projection): C2..C5 -> P2..P6 at 256 channels."""

from __future__ import annotations

from torch import Tensor, nn

from .masked_ops import has_padding, masked_group_norm, resize_mask, valid_of


class Neck(nn.Module):
    """1x1 conv + GroupNorm(32) per level (no activation); P6 = 3x3 stride-2 conv on C5 + GN."""

    def __init__(self, in_channels: tuple[int, ...], dim: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_channels)
        self.lateral_norm = nn.ModuleList(nn.GroupNorm(32, dim) for _ in in_channels)
        self.extra = nn.Conv2d(in_channels[-1], dim, 3, stride=2, padding=1)
        self.extra_norm = nn.GroupNorm(32, dim)
        for conv in [*self.lateral, self.extra]:
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)

    def forward(self, feats: list[Tensor], padding_mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Returns P2..P6 and their padding masks (True = pad)."""
        masks = [resize_mask(padding_mask, f.shape[-2:]) for f in feats]
        outs = [masked_group_norm(conv(f), m, gn)
                for f, m, conv, gn in zip(feats, masks, self.lateral, self.lateral_norm)]
        c5 = feats[-1]
        if has_padding(masks[-1]):
            c5 = c5 * valid_of(masks[-1]).to(c5.dtype)  # zeros outside, as the image alone sees
        p6 = self.extra(c5)
        m6 = resize_mask(padding_mask, p6.shape[-2:])
        outs.append(masked_group_norm(p6, m6, self.extra_norm))
        return outs, masks + [m6]
