"""ISDA head: class logits and position-aware dynamic 1x1 mask kernels for every decoder layer."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .float32 import autocast_off
from .masked_ops import has_padding, resize_mask


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class ISDAHead(nn.Module):
    """Shared across decoder layers (no box refinement): Linear classifier; MLP kernel branch whose last
    two kernel weights are the query's reference point (KP) when ``kernel_position``; with ``locality``
    (``model.mask_locality``) four more weights (:func:`locality_kernels`) for the MFR's locality channels."""

    def __init__(self, dim: int, num_classes: int, kernel_dim: int, kernel_position: bool,
                 prior_prob: float = 0.01, mask_class: bool = False, locality: bool = False,
                 mlp_hidden: int = 0) -> None:
        super().__init__()
        self.kernel_position = kernel_position
        # The locality's sharpness a = softplus(.) per query, per LOCALITY_UNIT_PX squared; 1 at initialisation
        # (-1 logit one unit from the point), learned from there.
        self.locality = nn.Linear(dim, 1) if locality else None
        if self.locality is not None:
            nn.init.zeros_(self.locality.weight)
            nn.init.constant_(self.locality.bias, math.log(math.e - 1))
        self.class_embed = nn.Linear(dim, num_classes)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        # model.mask_class: zero at initialisation, so that the model starts as the paper's.
        self.mask_class = nn.Linear(kernel_dim, num_classes) if mask_class else None
        if self.mask_class is not None:
            nn.init.zeros_(self.mask_class.weight)
            nn.init.zeros_(self.mask_class.bias)
        self.kernel_embed = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(),
            nn.Linear(dim, kernel_dim - 2 if kernel_position else kernel_dim),
        )
        # model.mask_mlp_hidden: the weights of a per-query two-layer head over every MFR channel (the locality's
        # included), appended to the kernel (see apply_kernels); its output weights start at zero, so that the
        # model starts as the linear head.
        self.mlp_embed = None
        if mlp_hidden:
            channels = kernel_dim + (LOCALITY_CHANNELS if locality else 0)
            self.mlp_embed = nn.Linear(dim, mlp_hidden * (channels + 2))
            with torch.no_grad():
                self.mlp_embed.weight[-mlp_hidden:].zero_()
                self.mlp_embed.bias[-mlp_hidden:].zero_()

    def classify(self, hidden: Tensor) -> Tensor:
        """hidden (..., Q, C) -> class logits (..., Q, classes)."""
        return self.class_embed(hidden)

    def mask_pooled_logits(self, logits: Tensor, mask_logits: Tensor, mask_features: Tensor) -> Tensor:
        """``model.mask_class``: class logits (layers, B, Q, C) plus a linear classifier of each query's mask
        features (B, K, h, w) averaged under its predicted mask (mask logits (n, B, Q, h, w) of the last n layers,
        used as weights without gradient). The decoder reads small objects from a few stride-8 tokens; the mask
        features are at the mask stride."""
        weights = mask_logits.detach().sigmoid().flatten(3)
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-6)
        features = mask_features[:, :self.mask_class.in_features]  # not the locality channels
        pooled = torch.einsum("lbqn,bkn->lbqk", weights, features.flatten(2).to(weights.dtype))
        n = mask_logits.shape[0]
        return torch.cat([logits[:-n], logits[-n:] + self.mask_class(pooled.to(logits.dtype))])

    def kernels(self, hidden: Tensor, reference_points: Tensor, image_size_px: Tensor | None = None) -> Tensor:
        """hidden (layers, B, Q, C); reference (layers, B, Q, 2) -> dynamic 1x1 kernels (layers, B, Q, K).
        ``image_size_px`` (B, 2): each image's own (width, height), for ``locality``."""
        kernels = self.kernel_embed(hidden)
        if self.kernel_position:
            ref = inverse_sigmoid(reference_points).to(kernels.dtype)
            kernels = torch.cat([kernels, ref], -1)
        if self.locality is not None:  # in float32 (see apply_kernels_float32)
            a = F.softplus(self.locality(hidden)).float()
            kernels = torch.cat([kernels.float(), locality_kernels(a, reference_points, image_size_px)], -1)
        if self.mlp_embed is not None:
            kernels = torch.cat([kernels, self.mlp_embed(hidden).to(kernels.dtype)], -1)
        return kernels


LOCALITY_CHANNELS = 4  # model.mask_locality's MFR channels (x, y, x^2 + y^2, 1) and kernel weights
LOCALITY_UNIT_PX = 64.0  # model.mask_locality's distances in this unit: pixels of the image, whatever its size


def locality_kernels(sharpness: Tensor, points: Tensor, image_size_px: Tensor) -> Tensor:
    """sharpness a (..., 1) >= 0, points p (..., B, Q, 2) in [0, 1] of each image's own area, image_size_px (B, 2)
    its (width, height) -> the four kernel weights that, applied to the MFR's locality channels (x, y, x^2 + y^2, 1)
    (:func:`isda.models.mask_features.locality_channels`, pixel centres in :data:`LOCALITY_UNIT_PX`), add
    -a |(x, y) - p|^2 to the mask logit: the quadratic expanded, so that a mask is still one linear kernel over the
    MFR (matching, losses and the ONNX graph unchanged). In pixel units, a learned at one input size holds at
    another (crops in training, whole images at test)."""
    p = points.float() * image_size_px[:, None, :] / LOCALITY_UNIT_PX
    return torch.cat([2 * sharpness * p, -sharpness, -sharpness * (p * p).sum(-1, keepdim=True)], -1)


def apply_kernels(kernels: Tensor, mask_features: Tensor) -> Tensor:
    """kernels (layers, B, Q, K), MFR (B, K, H, W) -> mask logits (layers, B, Q, H, W). A kernel longer than the
    MFR's K channels also carries a two-layer head's weights (``model.mask_mlp_hidden``, :func:`mlp_logits`)."""
    K = mask_features.shape[1]
    if kernels.shape[-1] == K:
        return torch.einsum("lbqk,bkhw->lbqhw", kernels, mask_features)
    logits = torch.einsum("lbqk,bkhw->lbqhw", kernels[..., :K], mask_features)
    L, B, Q = kernels.shape[:3]
    rows = kernels.transpose(0, 1).reshape(B, L * Q, -1)
    extra = mlp_logits(rows, mask_features.flatten(2)).view(B, L, Q, *mask_features.shape[-2:])
    return logits + extra.transpose(0, 1)


def mlp_logits(kernels: Tensor, features: Tensor) -> Tensor:
    """The nonlinear part of kernels (B, R, K + h (K + 2)) that carry, after the K linear weights, a two-layer head's
    weights W1 (h, K), b1 (h) and w2 (h) (CondInst's dynamic mask head, here beside the paper's linear kernel):
    w2 . relu(W1 f + b1) for each image's features f (B, K, N) -> (B, R, N). The per-query bias b1 with the MFR's
    coordinate channels makes the head's input relative to the query."""
    (B, R, _), K = kernels.shape, features.shape[1]
    h = (kernels.shape[-1] - K) // (K + 2)
    w1 = kernels[..., K:K + h * K].reshape(B, R * h, K)
    b1, w2 = kernels[..., K + h * K:].split(h, -1)
    hidden = torch.relu(torch.bmm(w1, features).view(B, R, h, features.shape[-1]) + b1[..., None])
    return (w2[..., None] * hidden).sum(2)


@autocast_off
def apply_kernels_float32(kernels: Tensor, mask_features: Tensor) -> Tensor:
    """:func:`apply_kernels` in float32 under autocast: ``model.mask_locality``'s expanded quadratic adds terms
    far larger than their sum, which bfloat16's 8-bit mantissa would not keep (its kernel weights and MFR channels
    are float32 for the same reason)."""
    return apply_kernels(kernels.float(), mask_features.float())


def select_mask_logits(kernels: Tensor, mask_features: Tensor, layer: Tensor, image: Tensor, query: Tensor) -> Tensor:
    """``apply_kernels(kernels, mask_features)[layer, image, query]`` (n, H, W), computing those n rows only:
    one product per image, the rows put back in the given order."""
    B, K, H, W = mask_features.shape
    rows = kernels[layer, image, query]
    order = torch.argsort(image, stable=True)  # boolean selection below keeps each image's rows in order

    def product(rows: Tensor, features: Tensor) -> Tensor:
        logits = rows[:, :K] @ features
        return logits if rows.shape[-1] == K else logits + mlp_logits(rows[None], features[None])[0]

    parts = torch.cat([product(rows[image == b], mask_features[b].reshape(K, H * W)) for b in range(B)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return parts[inverse].view(-1, H, W)


PADDING_LOGIT = -1e4  # sigmoid -> 0; finite (and within fp16 range) so that no loss sees inf


def mask_padding(mask_logits: Tensor, padding: Tensor) -> Tensor:
    """Padded pixels are no part of any mask: without this their logit is 0 (p = 0.5, the MFR is zero there),
    which the dice loss and the matcher would count against every prediction."""
    return mask_logits.masked_fill(padding, PADDING_LOGIT) if has_padding(padding) else mask_logits


def from_own_cells(interpolate: Callable[[Tensor], Tensor], mask_logits: Tensor, padding: Tensor | None) -> Tensor:
    """``interpolate`` (a linear map of (n, h, w) maps) of the mask logits from the image's own cells only: the
    padded cells' weights renormalised away, so that the image's border reads as the image alone would."""
    if not has_padding(padding):
        return interpolate(mask_logits)
    valid = (~padding).to(mask_logits.dtype)
    return interpolate(mask_logits * valid) / interpolate(valid).clamp(min=1e-6)


def upsample_mask_logits(mask_logits: Tensor, padding: Tensor | None, factor: int) -> Tensor:
    """(n, h, w) mask logits and their (n, h, w) padding (or None) -> (n, h * factor, w * factor): bilinear (as
    ``F.interpolate(..., scale_factor=factor, mode="bilinear")``) from the image's own cells only (at its border as
    the image alone would be upsampled, not blended with the padding's -1e4), padded out again at the finer
    resolution. As two products with the interpolation matrices: the same numbers, and a backward of two products
    where upsample_bilinear2d's backward took a tenth of a tiny training step."""
    if factor == 1:
        return mask_logits
    h, w = mask_logits.shape[-2:]
    rows, cols = (bilinear_matrix(n, factor, mask_logits.device, mask_logits.dtype) for n in (h, w))

    fine = from_own_cells(lambda x: rows @ x @ cols.T, mask_logits, padding)
    if not has_padding(padding):
        return fine
    return mask_padding(fine, resize_mask(padding, fine.shape[-2:]))  # a fine pixel is padding where its cell is


def point_sample_logits(mask_logits: Tensor, padding: Tensor | None, points: Tensor) -> Tensor:
    """(n, h, w) mask logits, their (n, h, w) padding (or None) and (n, K, 2) positions (x, y) in [0, 1] of the
    padded map -> (n, K) logits there: bilinear from the image's own cells with edge clamping, so at the centre of
    a finer pixel it is :func:`upsample_mask_logits`' value."""
    grid = (2 * points - 1).unsqueeze(1).to(mask_logits.dtype)  # (n, 1, K, 2) in grid_sample's [-1, 1]

    return from_own_cells(lambda x: F.grid_sample(x.unsqueeze(1), grid, mode="bilinear", padding_mode="border",
                                                  align_corners=False).flatten(1), mask_logits, padding)


def bilinear_matrix(size: int, factor: int, device: torch.device | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """(size * factor, size): 1-D bilinear upsampling by ``factor`` with align_corners=False and edge clamping, as
    F.interpolate computes it (source coordinate (i + 0.5) / factor - 0.5, at least 0)."""
    src = ((torch.arange(size * factor, dtype=torch.float64) + 0.5) / factor - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=size - 1)
    hi = (lo + 1).clamp(max=size - 1)
    frac = src - lo
    m = torch.zeros(size * factor, size, dtype=torch.float64)
    m[torch.arange(size * factor), lo] += 1 - frac
    m[torch.arange(size * factor), hi] += frac
    return m.to(device=device, dtype=dtype)


def matched_mask_logits(kernels: Tensor, mask_features: Tensor, padding_mask: Tensor, layer: Tensor, image: Tensor,
                        query: Tensor) -> Tensor:
    """The padded-out mask logits of the given (layer, image, query) rows (n, H, W), with autograd: what the
    mask losses need of the model's outputs (kernels, mask features and their padding mask (B, H, W))."""
    return mask_padding(select_mask_logits(kernels, mask_features, layer, image, query), padding_mask[image])
