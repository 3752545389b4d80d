"""ISDA head: class logits and position-aware dynamic 1x1 mask kernels for every decoder layer."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class ISDAHead(nn.Module):
    """Shared across decoder layers (no box refinement): Linear classifier; MLP kernel branch whose last
    two kernel weights are the query's reference point (KP) when ``kernel_position``."""

    def __init__(self, dim: int, num_classes: int, kernel_dim: int, kernel_position: bool,
                 prior_prob: float = 0.01) -> None:
        super().__init__()
        self.kernel_position = kernel_position
        self.class_embed = nn.Linear(dim, num_classes)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        self.kernel_embed = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(),
            nn.Linear(dim, kernel_dim - 2 if kernel_position else kernel_dim),
        )

    def classify(self, hidden: Tensor) -> Tensor:
        """hidden (..., Q, C) -> class logits (..., Q, classes)."""
        return self.class_embed(hidden)

    def mask_logits(self, hidden: Tensor, reference_points: Tensor, mask_features: Tensor) -> Tensor:
        """hidden (layers, B, Q, C); reference (layers, B, Q, 2); MFR (B, K, H, W) -> (layers, B, Q, H, W):
        each query's kernel applied as a 1x1 convolution to the MFR."""
        kernels = self.kernel_embed(hidden)
        if self.kernel_position:
            ref = inverse_sigmoid(reference_points).to(kernels.dtype)
            kernels = torch.cat([kernels, ref], -1)
        return torch.einsum("lbqk,bkhw->lbqhw", kernels, mask_features)
