"""Hungarian matching between predictions and ground truth: 2 x focal class cost + 3 x mask cost (soft IoU, as the
official code; or dice, ``loss.match_mask_cost_kind``)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..config import LossConfig
from .float32 import autocast_off


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """(Q, C) logits, (N,) labels -> (Q, N): focal loss of predicting the label minus of not predicting it."""
    p = logits.sigmoid()
    neg = (1 - alpha) * p.pow(gamma) * -(1 - p + 1e-12).log()  # eps 1e-12 as the official FocalLossCost
    pos = alpha * (1 - p).pow(gamma) * -(p + 1e-12).log()
    return pos[:, labels] - neg[:, labels]


def dice_cost(mask_logits: Tensor, targets: Tensor) -> Tensor:
    """(Q, HW) logits, (N, HW) float targets -> (Q, N) 1 - Laplace-smoothed dice coefficient (not the official
    cost: ``loss.match_mask_cost_kind=dice``)."""
    p = mask_logits.sigmoid()
    num = 2 * (p @ targets.T)  # not (2 * p): that scales all Q x HW probabilities first
    den = p.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (num + 1) / (den + 1)


def soft_iou_cost(mask_logits: Tensor, targets: Tensor) -> Tensor:
    """(Q, HW) logits, (N, HW) float targets -> (Q, N) 1 - soft IoU of the sigmoid masks, the official code's
    MaskIoUCost: 1 - sum(p t) / (sum(p) + sum(t) - sum(p t) + 1e-6)."""
    p = mask_logits.sigmoid()
    inter = p @ targets.T
    union = p.sum(-1)[:, None] + targets.sum(-1)[None, :] - inter
    return 1 - inter / (union + 1e-6)


MASK_COSTS = {"iou": soft_iou_cost, "dice": dice_cost}


@torch.no_grad()
@autocast_off  # the costs in float32: autocast would run the mask products in half precision
def hungarian_match(logits: Tensor, mask_logits: Tensor, labels: Tensor, target_masks: Tensor,
                    cfg: LossConfig, points: Tensor | None = None, target_points: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
    """One image: logits (Q, C), mask logits (Q, HW), labels (N,), target masks (N, HW) at the same scale;
    with point refinement, points (Q, 2) and target points (N, 2) add an L1 cost (DETR's box L1 cost).
    Returns (query indices, target indices), each (min(Q, N),)."""
    if labels.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    cost = (cfg.match_class_cost * focal_class_cost(logits.float(), labels, cfg.focal_alpha, cfg.focal_gamma)
            + cfg.match_mask_cost * MASK_COSTS[cfg.match_mask_cost_kind](mask_logits.float(), target_masks.float()))
    if points is not None:
        cost = cost + cfg.point_weight * torch.cdist(points.float(), target_points.float(), p=1)
    # A NaN/inf cost must not crash the solver (a known DETR-family failure): make it the worst finite cost.
    cost = cost.cpu().double()
    finite = torch.isfinite(cost)
    if not bool(finite.all()):
        worst = cost[finite].abs().max().item() * 2 + 1 if bool(finite.any()) else 1.0
        cost = torch.where(finite, cost, torch.full_like(cost, worst))
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
