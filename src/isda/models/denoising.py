"""Opt-in, training only (``model.denoising_groups``), not in the paper: DN-DETR's query denoising.

Besides the learned queries, the decoder gets ``groups`` copies of every ground-truth instance as queries: the
content is the embedding of its label (flipped to a random class with probability ``label_noise``) and the
reference point its mask centroid, shifted by up to ``point_noise`` x half its box size. Each such query is
trained to reconstruct its own instance (class, mask, point) with a fixed assignment, no Hungarian matching:
the decoder and head learn to refine a nearby, roughly labelled query into the instance early in training, when
the matching of the learned queries is still unstable. The groups see the learned queries but not each other,
and the learned queries see none of them; at inference nothing is built, so the model stays the same.

The copies grow with the instances of an image: ``max_queries`` (as DINO caps its denoising queries) cuts the
groups of a batch to fit, keeping at least one, so an image of dozens of instances does not multiply a step's cost.

With ``negatives`` (DINO's contrastive denoising) each group also holds a second, farther copy of every instance,
its point moved by between one and two times the positive copies' largest shift on each axis, trained as
background: the decoder learns to reject a query near an instance that a closer query already claims (the
duplicates a set predictor must not emit), not only to refine one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import masks_to_boxes

from .head import inverse_sigmoid
from .position_encoding import point_encoding


@dataclass
class DenoisingQueries:
    """``groups`` x ``size`` queries per image (group-major; ``size`` = the batch's most instances per image)."""

    content: Tensor  # (B, G * M, C)
    position: Tensor  # (B, G * M, C) query position embedding
    reference: Tensor  # (B, G * M, 2) noised centroids (x, y) in [0, 1] of the image
    groups: int
    size: int  # slots per group: the positive copies first, then (with negatives) as many negative ones

    def matches(self, counts: list[int]) -> list[tuple[Tensor, Tensor]]:
        """Per image with ``counts[b]`` instances: (query, target) indices of the positive copies into the queries
        and into the instances repeated ``groups`` times (the criterion's targets); every other slot, negative
        copies included, is trained as background."""
        device = self.reference.device
        out = []
        for n in counts:
            g = torch.arange(self.groups, device=device)[:, None]
            i = torch.arange(n, device=device)[None, :]
            out.append(((g * self.size + i).flatten(), (g * n + i).flatten()))
        return out


class Denoising(nn.Module):
    def __init__(self, dim: int, num_classes: int, groups: int, label_noise: float, point_noise: float,
                 max_queries: int = 0, negatives: bool = False) -> None:
        super().__init__()
        self.num_classes, self.groups, self.max_queries = num_classes, groups, max_queries
        self.negatives = negatives
        self.label_noise, self.point_noise = label_noise, point_noise
        self.label_embed = nn.Embedding(num_classes, dim)
        # The learned queries' position embeddings are free parameters; a noised point needs one computed from it.
        self.pos_mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, targets: list[dict[str, Tensor]], centroids: list[Tensor]) -> DenoisingQueries:
        """targets[b]: ``labels`` (N_b,) and ``masks`` (N_b, H, W) bool of the image; centroids[b] (N_b, 2)
        normalized to the image. The slots of images with fewer instances (at least one per group, so that every
        parameter has a gradient, which DistributedDataParallel needs) are trained as background."""
        most = max(1, *(len(t["labels"]) for t in targets))
        size = 2 * most if self.negatives else most  # a negative copy beside every positive one
        groups = self.groups if not self.max_queries else max(1, min(self.groups, self.max_queries // size))
        B, dim, device = len(targets), self.label_embed.embedding_dim, centroids[0].device
        labels = torch.zeros(B, groups, size, dtype=torch.long, device=device)
        points = torch.full((B, groups, size, 2), 0.5, device=device)
        for b, (t, c) in enumerate(zip(targets, centroids)):
            n = len(t["labels"])
            if n == 0:
                continue
            H, W = t["masks"].shape[-2:]
            box = torch.zeros(n, 4, device=device)
            nonempty = t["masks"].flatten(1).any(1)  # masks_to_boxes fails on an empty mask
            box[nonempty] = masks_to_boxes(t["masks"][nonempty]) / torch.tensor([W, H, W, H], device=device)
            half = (box[:, 2:] - box[:, :2]) / 2  # (n, 2): half the box size
            lab = t["labels"].repeat(groups, 1)  # (G, n)
            # Positive copies (slots from 0) shift by up to point_noise x half the box on each axis, negative ones
            # (slots from ``most``) by 1-2 times that.
            for start in (0, most) if self.negatives else (0,):
                flip = torch.rand(lab.shape, device=device) < self.label_noise
                labels[b, :, start:start + n] = torch.where(flip, torch.randint_like(lab, self.num_classes), lab)
                shift = torch.rand(groups, n, 2, device=device) * 2 - 1  # uniform in [-1, 1]
                if start:  # negative: uniform in [-2, -1] and [1, 2]
                    shift = shift + shift.sign()
                points[b, :, start:start + n] = (c + shift * half * self.point_noise).clamp(0, 1)
        points = points.view(B, -1, 2)
        # Through logit space and back, as every reference point in the decoder (never exactly 0 or 1).
        reference = inverse_sigmoid(points).sigmoid()
        return DenoisingQueries(self.label_embed(labels.view(B, -1)), self.pos_mlp(point_encoding(reference, dim)),
                                reference, groups, size)


def self_attention_mask(num_queries: int, hybrid_queries: int, denoising: DenoisingQueries | None,
                        device: torch.device) -> Tensor | None:
    """The decoder's self-attention mask over [one-to-one | one-to-many | denoising groups] (True = blocked):
    each set sees only itself, except that denoising queries also see the one-to-one queries."""
    if not hybrid_queries and denoising is None:
        return None
    parts = [torch.zeros(num_queries, dtype=torch.long), torch.full((hybrid_queries,), -1)]
    if denoising is not None:
        parts.append(torch.arange(1, denoising.groups + 1).repeat_interleave(denoising.size))
    group = torch.cat(parts).to(device)
    blocked = group[:, None] != group[None, :]
    blocked[num_queries + hybrid_queries:, :num_queries] = False
    return blocked
