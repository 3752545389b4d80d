"""Sine positional encoding over the valid (un-padded) region of each image."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sine_position_encoding(padding_mask: Tensor, num_feats: int = 128, temperature: float = 10000.0,
                           offset: float = -0.5, eps: float = 1e-6) -> Tensor:
    """(B, H, W) padding mask -> (B, 2*num_feats, H, W): [y features, x features], normalized to 2*pi."""
    not_mask = (~padding_mask).to(torch.float32)
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    scale = 2 * math.pi
    y = (y + offset) / (y[:, -1:, :] + eps) * scale
    x = (x + offset) / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=padding_mask.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_x = x[..., None] / dim_t
    pos_y = y[..., None] / dim_t
    # Interleave sin (even features) and cos (odd features).
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
