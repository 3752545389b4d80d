"""Hungarian matcher vs brute force; focal and dice losses vs hand computation (the official forms and the mask
costs against the official formulas: test_official_losses.py)."""

import itertools
import math

import pytest
import torch

from isda.config import LossConfig
from isda.models.losses import SetCriterion, dice_loss
from isda.models.matcher import MASK_COSTS, focal_class_cost, hungarian_match

CFG = LossConfig()


def total_cost(logits, mask_logits, labels, masks, rows, cols, points=(), kind="iou"):
    cost = 2 * focal_class_cost(logits, labels, 0.25, 2.0) + 3 * MASK_COSTS[kind](mask_logits, masks)
    if points:  # model.refine_points: + 5 x L1 distance of the query's point to the instance's centroid
        cost = cost + 5 * (points[0][:, None] - points[1][None]).abs().sum(-1)
    return float(cost[rows, cols].sum())


@pytest.mark.parametrize("kind", ["iou", "dice"])
@pytest.mark.parametrize("seed", range(8))
def test_matcher_equals_brute_force(seed, kind):
    g = torch.Generator().manual_seed(seed)
    Q, C, HW = 6, 3, 20
    N = int(torch.randint(1, 5, (1,), generator=g))
    logits = torch.randn(Q, C, generator=g) * 2
    mask_logits = torch.randn(Q, HW, generator=g) * 3
    labels = torch.randint(0, C, (N,), generator=g)
    masks = (torch.rand(N, HW, generator=g) > 0.5).float()
    points = (torch.rand(Q, 2, generator=g), torch.rand(N, 2, generator=g)) if seed % 2 else ()
    rows, cols = hungarian_match(logits, mask_logits, labels, masks, LossConfig(match_mask_cost_kind=kind), *points)
    assert len(rows) == N and sorted(cols.tolist()) == list(range(N)) and len(set(rows.tolist())) == N
    best = min(total_cost(logits, mask_logits, labels, masks, list(perm), list(range(N)), points, kind)
               for perm in itertools.permutations(range(Q), N))
    assert total_cost(logits, mask_logits, labels, masks, rows, cols, points, kind) == pytest.approx(best, abs=1e-5)


def test_matcher_survives_non_finite_costs():
    logits = torch.randn(4, 2)
    logits[1, 0] = float("nan")
    mask_logits = torch.randn(4, 9)
    mask_logits[2] = float("inf")
    rows, cols = hungarian_match(logits, mask_logits, torch.tensor([0, 1]), torch.ones(2, 9), CFG)
    assert len(rows) == 2 and sorted(cols.tolist()) == [0, 1]
    rows, _ = hungarian_match(torch.full((3, 2), float("nan")), torch.full((3, 9), float("nan")),
                              torch.tensor([0]), torch.ones(1, 9), CFG)
    assert len(rows) == 1


def test_matcher_without_targets():
    rows, cols = hungarian_match(torch.randn(4, 2), torch.randn(4, 9), torch.zeros(0, dtype=torch.long),
                                 torch.zeros(0, 9), CFG)
    assert rows.numel() == 0 and cols.numel() == 0


def hand_focal(x, t, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-x))
    pt = p if t else 1 - p
    a = alpha if t else 1 - alpha
    return -a * (1 - pt) ** gamma * math.log(pt)


def test_losses_equal_hand_computed_values():
    # One image, two queries, two classes, one instance of class 1 whose mask query 0 predicts well.
    logits = torch.tensor([[[[-1.0, 2.0], [0.5, -3.0]]]])  # (layers=1, B=1, Q=2, C=2)
    mask_logits = torch.tensor([[[[[4.0, 4.0], [-4.0, -4.0]], [[-2.0, 1.0], [1.0, -2.0]]]]])  # (1, 1, 2, 2, 2)
    target_masks = [torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])]
    targets = [{"labels": torch.tensor([1]), "masks": target_masks[0].bool()}]
    losses = SetCriterion(LossConfig(aux_loss=False))(logits, mask_logits, targets, target_masks)
    expected_cls = (hand_focal(-1.0, 0) + hand_focal(2.0, 1) + hand_focal(0.5, 0) + hand_focal(-3.0, 0)) / 1
    s = 1 / (1 + math.exp(-4.0))
    probs = [s, s, 1 - s, 1 - s]
    # The official dice (mmdet DiceLoss): 1 - 2 sum(p t) / (sum(p^2) + sum(t^2) + 2 * 1e-3).
    expected_dice = 1 - 2 * (probs[0] + probs[1]) / (sum(p * p for p in probs) + 2 + 2e-3)
    assert losses["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(expected_dice, abs=1e-6)  # float32: 1 - 0.99916
    assert losses["loss"].item() == pytest.approx(2 * expected_cls + 3 * expected_dice, rel=1e-5)

    # Opt-in binary cross-entropy on the matched mask (a convergence lever), mean over its pixels.
    losses = SetCriterion(LossConfig(aux_loss=False, mask_bce_weight=2.0))(logits, mask_logits, targets, target_masks)
    expected_bce = -(math.log(s) * 2 + math.log(s) * 2) / 4  # logits 4, 4 on 1-pixels and -4, -4 on 0-pixels
    assert losses["loss_bce"].item() == pytest.approx(expected_bce, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(2 * expected_cls + 3 * expected_dice + 2 * expected_bce, rel=1e-5)


def test_dice_loss_perfect_and_disjoint():
    t = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert dice_loss(torch.tensor([[50.0, 50.0, -50.0, -50.0]]), t).item() == pytest.approx(1 - 4 / 4.002, abs=1e-6)
    assert dice_loss(torch.tensor([[-50.0, -50.0, 50.0, 50.0]]), t).item() == pytest.approx(1.0, abs=1e-6)
    laplace = dice_loss(torch.tensor([[-50.0, -50.0, 50.0, 50.0]]), t, form="laplace")
    assert laplace.item() == pytest.approx(1 - 1 / 5, abs=1e-6)
