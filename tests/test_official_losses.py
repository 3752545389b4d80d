"""The paper preset's losses and matching costs are the official code's: dice loss (mmdet DiceLoss, eps 1e-3),
soft-IoU mask cost, focal class cost; each against a hand computation and against the official formula written out
element by element in float64 on random inputs."""

import math

import pytest
import torch

from isda.config import LossConfig, get_preset
from isda.models.losses import SetCriterion, dice_loss
from isda.models.matcher import dice_cost, focal_class_cost, hungarian_match, soft_iou_cost


def official_dice(p_row, t_row, eps=1e-3):
    """One pair, as the official DiceLoss reads: a = sum p t, b = sum p^2 + eps, c = sum t^2 + eps, 1 - 2a / (b + c)."""
    a = sum(p * t for p, t in zip(p_row, t_row))
    b = sum(p * p for p in p_row) + eps
    c = sum(t * t for t in t_row) + eps
    return 1 - 2 * a / (b + c)


def official_iou_cost(p_row, t_row):
    """One (query, instance) pair, as the official MaskIoUCost reads: 1 - inter / (sum p + sum t - inter + 1e-6)."""
    inter = sum(p * t for p, t in zip(p_row, t_row))
    return 1 - inter / (sum(p_row) + sum(t_row) - inter + 1e-6)


def official_focal_cost(p, alpha=0.25, gamma=2.0, eps=1e-12):
    """The official FocalLossCost of one probability for its label."""
    neg = -math.log(1 - p + eps) * (1 - alpha) * p ** gamma
    pos = -math.log(p + eps) * alpha * (1 - p) ** gamma
    return pos - neg


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_paper_preset_uses_the_official_losses_and_costs():
    loss = get_preset("isda_r50_coco").loss
    assert (loss.dice_form, loss.dice_eps, loss.dice_weight) == ("official", 1e-3, 3.0)
    assert (loss.match_mask_cost_kind, loss.match_mask_cost, loss.match_class_cost) == ("iou", 3.0, 2.0)
    assert (loss.class_loss, loss.class_weight, loss.focal_alpha, loss.focal_gamma) == ("focal", 2.0, 0.25, 2.0)
    assert loss.mask_bce_weight == 0 and loss.aux_loss


def test_official_dice_loss_by_hand():
    # p = sigmoid(0) = 0.5 on four pixels, target 1 on the first two:
    # 1 - 2 * (0.5 + 0.5) / (4 * 0.25 + 2 + 0.002) = 1 - 2 / 3.002
    loss = dice_loss(torch.zeros(1, 4), torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    assert loss.item() == pytest.approx(1 - 2 / 3.002, rel=1e-6)
    # An empty prediction of an empty target: 1 - 0 / (0 + 0 + 0.002) = 1 (the official form has no +1 smoothing).
    assert dice_loss(torch.full((1, 4), -60.0), torch.zeros(1, 4)).item() == pytest.approx(1.0)
    # The Laplace-smoothed form (loss.dice_form=laplace) of the same pair: 1 - (2 + 1) / (2 + 2 + 1).
    assert dice_loss(torch.zeros(1, 4), torch.tensor([[1.0, 1.0, 0.0, 0.0]]), form="laplace").item() == \
        pytest.approx(1 - 3 / 5, rel=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_official_dice_loss_equals_the_official_formula_on_random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 37, generator=g, dtype=torch.float64) * 3
    targets = torch.rand(5, 37, generator=g, dtype=torch.float64)  # soft targets (bilinear downsampling)
    targets[1] = (targets[1] > 0.5).double()
    ours = dice_loss(logits, targets)
    p = logits.sigmoid().tolist()
    expected = [official_dice(p_row, t_row) for p_row, t_row in zip(p, targets.tolist())]
    assert ours.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_soft_iou_cost_by_hand():
    # p = (0.5, 0.5, 0.5, 0.5), t = (1, 1, 0, 0): inter 1, union 2 + 2 - 1 = 3 -> 1 - 1/3.
    # a confident prediction of the target itself: inter 2, union 2 -> 0.
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [60.0, 60.0, -60.0, -60.0]])
    cost = soft_iou_cost(logits, torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]))
    assert cost.flatten().tolist() == pytest.approx([1 - 1 / 3, 1 - 1 / 3, 0.0, 1.0], abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_soft_iou_cost_equals_the_official_formula_on_random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 29, generator=g, dtype=torch.float64) * 3
    targets = torch.rand(4, 29, generator=g, dtype=torch.float64)
    ours = soft_iou_cost(logits, targets)
    p, t = logits.sigmoid().tolist(), targets.tolist()
    expected = [[official_iou_cost(p_row, t_row) for t_row in t] for p_row in p]
    assert ours.tolist() == [pytest.approx(row, rel=1e-12, abs=1e-12) for row in expected]


def test_focal_class_cost_equals_the_official_formula():
    logits = torch.tensor([[-3.0, 0.0, 2.0], [25.0, -25.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([2, 0, 0])
    ours = focal_class_cost(logits, labels, 0.25, 2.0)
    expected = [[official_focal_cost(sigmoid(row[c])) for c in labels.tolist()] for row in logits.tolist()]
    assert ours.tolist() == [pytest.approx(row, rel=1e-9) for row in expected]


def test_matcher_uses_the_configured_mask_cost():
    # Query 0 predicts a large blob that covers both instances; query 1 exactly the small instance 0. Soft IoU and
    # the Laplace dice rank them the same here, but the costs differ: check each kind is what the matcher sums.
    g = torch.Generator().manual_seed(0)
    logits, mask_logits = torch.randn(5, 2, generator=g), torch.randn(5, 16, generator=g) * 3
    labels, masks = torch.tensor([0, 1]), (torch.rand(2, 16, generator=g) > 0.5).float()
    for kind, cost in (("iou", soft_iou_cost), ("dice", dice_cost)):
        cfg = LossConfig(match_mask_cost_kind=kind)
        rows, cols = hungarian_match(logits, mask_logits, labels, masks, cfg)
        total = 2 * focal_class_cost(logits, labels, 0.25, 2.0) + 3 * cost(mask_logits, masks)
        best = min(float(total[a, 0] + total[b, 1]) for a in range(5) for b in range(5) if a != b)
        assert float(total[rows, cols].sum()) == pytest.approx(best, abs=1e-6)


def test_criterion_dice_term_is_the_official_normalised_sum():
    # Two images (2 and 1 instances), one decoder layer: loss_dice = sum over matched pairs of the official dice /
    # the number of instances (the official avg_factor num_total_pos), weighted 3 in the total.
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 2, 4, 3, generator=g)
    mask_logits = torch.randn(1, 2, 4, 3, 3, generator=g) * 2
    target_masks = [torch.rand(2, 3, 3, generator=g), torch.rand(1, 3, 3, generator=g)]
    targets = [{"labels": torch.tensor([0, 2]), "masks": target_masks[0] > 0.5},
               {"labels": torch.tensor([1]), "masks": target_masks[1] > 0.5}]
    cfg = LossConfig(aux_loss=False)
    losses = SetCriterion(cfg)(logits, mask_logits, targets, target_masks)
    total = 0.0
    for b in range(2):
        rows, cols = hungarian_match(logits[0, b], mask_logits[0, b].flatten(1), targets[b]["labels"],
                                     target_masks[b].flatten(1), cfg)
        for q, t in zip(rows.tolist(), cols.tolist()):
            total += official_dice(mask_logits[0, b, q].flatten().sigmoid().tolist(),
                                   target_masks[b][t].flatten().tolist())
    assert losses["loss_dice"].item() == pytest.approx(total / 3, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(2 * losses["loss_cls"].item() + 3 * total / 3, rel=1e-5)


def test_bad_loss_forms_name_the_field():
    from isda.config import ConfigError, apply_overrides

    for key, value in (("loss.dice_form", "soft"), ("loss.match_mask_cost_kind", "l1"), ("loss.dice_eps", "0")):
        cfg = apply_overrides(get_preset("isda_r50_coco"), {key: value})
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            cfg.validate()
