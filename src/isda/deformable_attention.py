"""Multi-scale deformable attention module (Deformable DETR): offsets and weights from the query."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import gather_ms_deform_attn_pixels, ms_deform_attn


class MSDeformAttn(nn.Module):
    def __init__(self, dim: int = 256, num_levels: int = 4, num_heads: int = 8, num_points: int = 4) -> None:
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.keep_sampling = False  # set to keep the last (locations, weights) for visualization
        self.last_sampling: tuple[Tensor, Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start as a ring of points: head h looks in direction 2*pi*h/heads, point p at radius p+1.
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def sample(self, query: Tensor, reference_points: Tensor, spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
        """Sampling locations (B, Q, heads, L, P, 2) in [0, 1] and softmaxed weights (B, Q, heads, L, P)."""
        B, Q, _ = query.shape
        M, L, P = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).view(B, Q, M, L, P, 2)
        weights = F.softmax(self.attention_weights(query).view(B, Q, M, L * P), -1).view(B, Q, M, L, P)
        # Offsets are in pixels of each level: normalize by that level's (W, H).
        normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(offsets.dtype)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return locations, weights

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Tensor,
                value_padding_mask: Tensor | None = None) -> Tensor:
        """query (B, Q, C); reference_points (B, Q, L, 2) normalized; value (B, S, C); mask (B, S) True=pad."""
        B, S, C = value.shape
        v = self.value_proj(value)
        if value_padding_mask is not None and bool(value_padding_mask.any()):
            v = v.masked_fill(value_padding_mask[..., None], 0.0)  # padded tokens contribute nothing
        v = v.view(B, S, self.num_heads, C // self.num_heads)
        # The core runs in float32 under autocast: half-precision sampling overflows (known peer bug).
        if query.device.type == "cpu" and not self.keep_sampling:
            with torch.autocast(device_type="cpu", enabled=False):
                out = self._gather(query, reference_points, v.float(), spatial_shapes)
        else:
            locations, weights = self.sample(query, reference_points, spatial_shapes)
            if self.keep_sampling:
                self.last_sampling = (locations.detach(), weights.detach())
            with torch.autocast(device_type=query.device.type, enabled=False):
                out = ms_deform_attn(v.float(), spatial_shapes, locations.float(), weights.float())
        return self.output_proj(out.to(query.dtype))

    def _gather(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Tensor) -> Tensor:
        """``sample`` + ``ms_deform_attn`` (gather implementation) in pixel units: a sample's position in a
        level is reference * size + offset (what ``sample`` normalizes and the core multiplies back)."""
        B, Q, _ = query.shape
        M, L, P = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).float().view(B, Q, M, L, P, 2)
        weights = F.softmax(self.attention_weights(query).float().view(B, Q, M, L * P), -1).view(B, Q, M, L, P)
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        size = offsets.new_tensor([[w, h] for h, w in shapes]).view(L, 2)
        # (B, Q, L, 2) -> (B, Q, 1, L, P, 2) in the core's border pixels (pixel centres at 1..size).
        ref = torch.addcmul(offsets.new_full((), 0.5), reference_points.float(), size)
        pixels = offsets + ref[:, :, None, :, None, :].expand(B, Q, 1, L, P, 2).contiguous()
        return gather_ms_deform_attn_pixels(value, shapes, pixels, weights)
