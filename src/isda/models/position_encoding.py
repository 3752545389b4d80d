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
    pos_x, pos_y = _interleaved_sine(x, num_feats, temperature), _interleaved_sine(y, num_feats, temperature)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def point_encoding(points: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """(..., 2) points (x, y) in [0, 1] -> (..., dim): the same encoding, [y features, x features]."""
    pos = _interleaved_sine(points.float() * (2 * math.pi), dim // 2, temperature)  # (..., 2, dim/2)
    return torch.cat((pos[..., 1, :], pos[..., 0, :]), -1).to(points.dtype)


def _interleaved_sine(x: Tensor, num_feats: int, temperature: float) -> Tensor:
    """(...) positions scaled to [0, 2*pi] -> (..., num_feats): sin on even features, cos on odd ones."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = x[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)
