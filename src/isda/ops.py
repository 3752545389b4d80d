"""Multi-scale deformable attention core (pure PyTorch: CPU, CUDA and MPS, no compiled extension)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Bilinearly sample each level's value map at the sampling locations and sum with the weights.

    Deformable-DETR convention:
      value: (B, S, heads, head_dim), S = sum(H_l * W_l) in level order (row-major per level).
      spatial_shapes: (L, 2) int64 rows (H_l, W_l).
      sampling_locations: (B, Q, heads, L, P, 2) normalized (x, y) in [0, 1] (outside samples zero).
      attention_weights: (B, Q, heads, L, P).
    Returns (B, Q, heads * head_dim).
    """
    B, S, M, D = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be (B, Q, heads, L, P, 2), got {tuple(sampling_locations.shape)}")
    _, Q, _, L, P, _ = sampling_locations.shape
    if sampling_locations.shape[:3] != (B, Q, M) or attention_weights.shape != (B, Q, M, L, P):
        raise ValueError(
            f"shape mismatch: value {tuple(value.shape)}, sampling_locations {tuple(sampling_locations.shape)}, "
            f"attention_weights {tuple(attention_weights.shape)}"
        )
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if len(shapes) != L or sum(h * w for h, w in shapes) != S:
        raise ValueError(f"spatial_shapes {shapes} do not describe {L} levels with {S} value tokens")

    # grid_sample wants (N, C, H, W) maps and (N, Q, P, 2) grids in [-1, 1]; fold heads into N.
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)  # (B*M, Q, L, P, 2)
    weights = attention_weights.transpose(1, 2).flatten(0, 1).unsqueeze(1)  # (B*M, 1, Q, L, P)
    values = value.flatten(2).transpose(1, 2).reshape(B * M, D, S)  # (B*M, D, S)
    out = value.new_zeros(B * M, D, Q)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        v = values[:, :, start : start + h * w].reshape(B * M, D, h, w)
        start += h * w
        sampled = F.grid_sample(v, grids[:, :, lvl], mode="bilinear", padding_mode="zeros", align_corners=False)
        # Accumulate per level instead of stacking levels: peak memory of one level's samples.
        out = out + (sampled * weights[:, :, :, lvl]).sum(-1)
    return out.view(B, M * D, Q).transpose(1, 2).contiguous()
