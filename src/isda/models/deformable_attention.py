"""Multi-scale deformable attention module (Deformable DETR): offsets and weights from the query."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import gather_ms_deform_attn_pixels, ms_deform_attn, ms_deform_attn_traceable
from .masked_ops import exporting, has_padding


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
        # CPU: project the values after sampling them (True), before (False), or whichever gathers less (None).
        self.project_after: bool | None = None
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
        offsets = self.sampling_offsets(query).view(B, Q, M, L * P * 2)
        weights = F.softmax(self.attention_weights(query).view(B, Q, M, L * P), -1).view(B, Q, M, L, P)
        # Offsets are in pixels of each level: normalize by that level's (W, H). Both operands broadcast over
        # a contiguous trailing block (levels x points x 2) rather than inside the (x, y) pairs: the same
        # numbers, and ONNX Runtime's broadcasting took 6 % of an exported r50's time the other way.
        normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(offsets.dtype)
        normalizer = normalizer[:, None].expand(L, P, 2).reshape(L * P * 2)
        reference = reference_points[:, :, None, :, None, :].expand(B, Q, 1, L, P, 2).reshape(B, Q, 1, L * P * 2)
        locations = reference + offsets / normalizer
        return locations.view(B, Q, M, L, P, 2), weights

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Tensor,
                value_padding_mask: Tensor | None = None) -> Tensor:
        """query (B, Q, C); reference_points (B, Q, L, 2) normalized; value (B, S, C); mask (B, S) True=pad."""
        B, S, C = value.shape
        padded = has_padding(value_padding_mask)
        M, Q = self.num_heads, query.shape[1]
        # The core runs in float32 under autocast: half-precision sampling overflows (known peer bug).
        if query.device.type == "cpu" and not self.keep_sampling and not exporting():
            samples = Q * M * 4 * self.num_levels * self.num_points  # rows gathered
            fewer = samples + Q * C < S * C  # projecting after sampling gathers and multiplies less
            if self.project_after if self.project_after is not None else fewer:
                # Few queries on a large map (the decoder): sample the input map, project only the samples.
                out = self._gather_then_project(query, reference_points, value, spatial_shapes,
                                                 value_padding_mask if padded else None)
                return self.output_proj(out.to(query.dtype))
            v = self.value_proj(value)
            if padded:
                v = v.masked_fill(value_padding_mask[..., None], 0.0)  # padded tokens contribute nothing
            out = self._gather(query, reference_points, v.view(B, S, M, C // M), spatial_shapes)
            return self.output_proj(out.to(query.dtype))
        v = self.value_proj(value)
        if padded:
            v = v.masked_fill(value_padding_mask[..., None], 0.0)  # padded tokens contribute nothing
        v = v.view(B, S, M, C // M)
        locations, weights = self.sample(query, reference_points, spatial_shapes)
        if self.keep_sampling:
            self.last_sampling = (locations.detach(), weights.detach())
        with torch.autocast(device_type=query.device.type, enabled=False):
            core = ms_deform_attn_traceable if exporting() else ms_deform_attn
            out = core(v.float(), spatial_shapes, locations.float(), weights.float())
        return self.output_proj(out.to(query.dtype))

    def _pixels_and_weights(self, query: Tensor, reference_points: Tensor, spatial_shapes: Tensor
                            ) -> tuple[list[tuple[int, int]], Tensor, Tensor]:
        """``sample`` in the gather core's units: a sample's position in a level is reference * size + offset
        (which ``sample`` divides by the size and the core multiplies back), + 0.5 for the zero border."""
        B, Q, _ = query.shape
        M, L, P = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query)
        logits = self.attention_weights(query)
        with torch.autocast(device_type=query.device.type, enabled=False):
            weights = F.softmax(logits.float().view(B, Q, M, L * P), -1).view(B, Q, M, L, P)
            shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
            size = weights.new_tensor([[w, h] for h, w in shapes]).view(L, 2)
            # (B, Q, L, 2) -> (B, Q, 1, L, P, 2) in the core's border pixels (pixel centres at 1..size).
            ref = torch.addcmul(weights.new_full((), 0.5), reference_points.float(), size)
            pixels = offsets.float().view(B, Q, M, L, P, 2) + ref[:, :, None, :, None, :].expand(B, Q, 1, L, P, 2).contiguous()
        return shapes, pixels, weights

    def _gather(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Tensor) -> Tensor:
        """``sample`` + ``ms_deform_attn`` (gather implementation) on projected values (B, S, heads, head_dim)."""
        shapes, pixels, weights = self._pixels_and_weights(query, reference_points, spatial_shapes)
        with torch.autocast(device_type=query.device.type, enabled=False):
            return gather_ms_deform_attn_pixels(value.float(), shapes, pixels, weights)

    def _gather_then_project(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Tensor,
                             padding_mask: Tensor | None) -> Tensor:
        """The same result with value_proj moved after the sampling (it is linear, and bilinear sampling and the
        weighted sum are linear): every head samples the *input* map, and each head's weighted sum of input
        rows goes through that head's slice of value_proj. The bias counts with the total weight of the
        samples inside the map (outside ones read the zero padding of the projected map, bias included), so a
        column of ones (zeros for padded tokens) rides along. Cheaper when queries x heads x samples is small
        next to the map (the decoder: 300 queries on 20k tokens)."""
        B, S, C = value.shape
        M = self.num_heads
        shapes, pixels, weights = self._pixels_and_weights(query, reference_points, spatial_shapes)
        with torch.autocast(device_type=query.device.type, enabled=False):
            x = value.float()
            inside = x.new_ones(B, S, 1)
            if padding_mask is not None:
                x = x.masked_fill(padding_mask[..., None], 0.0)
                inside = inside.masked_fill(padding_mask[..., None], 0.0)
            table = torch.cat([x, inside], -1).view(B, S, 1, C + 1)
            sampled = gather_ms_deform_attn_pixels(table, shapes, pixels, weights).view(B * pixels.shape[1], M, C + 1)
            w = self.value_proj.weight.float().view(M, C // M, C)
            b = self.value_proj.bias.float().view(M, C // M)
            out = torch.bmm(sampled[..., :C].transpose(0, 1), w.transpose(1, 2)).transpose(0, 1)  # (B*Q, M, C/M)
            out = torch.addcmul(out, sampled[..., C:], b)
        return out.reshape(B, -1, C)
