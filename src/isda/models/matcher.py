"""Matching between predictions and ground truth on a cost of 2 x focal class cost + 3 x mask cost (soft IoU, as the
official code; or dice, ``loss.match_mask_cost_kind``): Hungarian (one-to-one) or, opt-in on the intermediate decoder
layers, top-k (``loss.o2m_topk``)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..config import LossConfig
from .float32 import autocast_off


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float, gamma: float, iou: Tensor | None = None,
                     quality: float = 0.0) -> Tensor:
    """(Q, C) logits, (N,) labels -> (Q, N): focal loss of predicting the label minus of not predicting it.
    With ``iou`` (Q, N), Stable-DINO's position-modulated cost: the score is p^(1 - quality) * iou^quality, so
    that a confident query with a poor mask is not the cheapest match (the matching ranks queries as the varifocal
    loss's IoU target does, which is Stable-DINO's position-supervised loss)."""
    p = logits.sigmoid()[:, labels]
    if iou is not None:
        p = p.pow(1 - quality) * iou.pow(quality)
    neg = (1 - alpha) * p.pow(gamma) * -(1 - p + 1e-12).log()  # eps 1e-12 as the official FocalLossCost
    pos = alpha * (1 - p).pow(gamma) * -(p + 1e-12).log()
    return pos - neg


def dice_cost(mask_logits: Tensor, targets: Tensor) -> Tensor:
    """(Q, HW) logits, (N, HW) float targets -> (Q, N) 1 - Laplace-smoothed dice coefficient (not the official
    cost: ``loss.match_mask_cost_kind=dice``)."""
    p = mask_logits.sigmoid()
    num = 2 * (p @ targets.T)  # not (2 * p): that scales all Q x HW probabilities first
    den = p.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (num + 1) / (den + 1)


def soft_iou(mask_logits: Tensor, targets: Tensor) -> Tensor:
    """(Q, HW) logits, (N, HW) float targets -> (Q, N) soft IoU of the sigmoid masks:
    sum(p t) / (sum(p) + sum(t) - sum(p t) + 1e-6)."""
    p = mask_logits.sigmoid()
    inter = p @ targets.T
    union = p.sum(-1)[:, None] + targets.sum(-1)[None, :] - inter
    return inter / (union + 1e-6)


def soft_iou_cost(mask_logits: Tensor, targets: Tensor) -> Tensor:
    """(Q, HW) logits, (N, HW) float targets -> (Q, N) 1 - soft IoU, the official code's MaskIoUCost."""
    return 1 - soft_iou(mask_logits, targets)


MASK_COSTS = {"iou": soft_iou_cost, "dice": dice_cost}


@autocast_off  # the costs in float32: autocast would run the mask products in half precision
@torch.no_grad()
def matching_cost(logits: Tensor, mask_logits: Tensor, labels: Tensor, target_masks: Tensor, cfg: LossConfig,
                  points: Tensor | None = None, target_points: Tensor | None = None) -> Tensor:
    """One image: logits (Q, C), mask logits (Q, HW), labels (N,), target masks (N, HW) at the same scale;
    with point refinement, points (Q, 2) and target points (N, 2) add an L1 cost (DETR's box L1 cost).
    Returns the (Q, N) cost, float64 on the CPU, every entry finite."""
    masks, targets = mask_logits.float(), target_masks.float()
    kind, quality = cfg.match_mask_cost_kind, cfg.match_quality
    iou = soft_iou(masks, targets) if quality or kind == "iou" else None
    class_cost = focal_class_cost(logits.float(), labels, cfg.focal_alpha, cfg.focal_gamma,
                                  iou if quality else None, quality)
    cost = cfg.match_class_cost * class_cost + cfg.match_mask_cost * (1 - iou if kind == "iou"
                                                                      else MASK_COSTS[kind](masks, targets))
    if points is not None:
        cost = cost + cfg.point_weight * torch.cdist(points.float(), target_points.float(), p=1)
    # A NaN/inf cost must not crash the solver (a known DETR-family failure): make it the worst finite cost.
    cost = cost.cpu().double()
    finite = torch.isfinite(cost)
    if not bool(finite.all()):
        worst = cost[finite].abs().max().item() * 2 + 1 if bool(finite.any()) else 1.0
        cost = torch.where(finite, cost, torch.full_like(cost, worst))
    return cost


def hungarian_match(logits: Tensor, mask_logits: Tensor, labels: Tensor, target_masks: Tensor,
                    cfg: LossConfig, points: Tensor | None = None, target_points: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
    """One-to-one matching of one image (arguments as :func:`matching_cost`). Returns (query indices, target
    indices), each (min(Q, N),)."""
    if labels.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    rows, cols = linear_sum_assignment(matching_cost(logits, mask_logits, labels, target_masks, cfg, points,
                                                     target_points).numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def topk_match(cost: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """One-to-many (many-to-one) matching on a (Q, N) finite cost: each target takes its k cheapest queries; a
    query taken by several targets keeps the cheapest of them (the others do not get another query instead).
    Returns (query indices, target indices), queries ascending, each query at most once."""
    Q, N = cost.shape
    if N == 0 or Q == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    top = cost.topk(min(k, Q), dim=0, largest=False).indices  # (k, N)
    taken = torch.full_like(cost, float("inf")).scatter_(0, top, cost.gather(0, top))
    best, target = taken.min(1)
    query = torch.isfinite(best).nonzero().squeeze(1)
    return query, target[query]
