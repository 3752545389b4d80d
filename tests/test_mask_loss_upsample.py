"""``loss.mask_loss_upsample``: the matched masks' losses on the logits upsampled by a factor, against targets at
that resolution, on every pixel or on ``loss.mask_loss_points`` sampled points. The upsampling against plain
bilinear on the image alone (padding-invariant), the point sampling against the upsampling, where the points fall,
the criterion's terms against a hand computation from its matches, the model's fine targets, and bad values. That it trains and
leaves inference and the ONNX graph unchanged is in test_matching_levers.py, with the other levers."""

import pytest
import torch
import torch.nn.functional as F

from isda.config import ConfigError, LossConfig, apply_overrides, get_preset
from isda.models.head import PADDING_LOGIT, bilinear_matrix, point_sample_logits, upsample_mask_logits
from isda.models.losses import (SetCriterion, dice_loss, downsample_masks, mask_bce_loss, mask_iou, sample_mask_points,
                               varifocal_loss)
from isda.models.matcher import hungarian_match

from model_utils import batch, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def _bilinear(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.interpolate(x[:, None], scale_factor=factor, mode="bilinear", align_corners=False)[:, 0]


@pytest.mark.parametrize("size", [1, 2, 5, 32])
@pytest.mark.parametrize("factor", [2, 4, 8])
def test_the_interpolation_matrix_is_torchs_bilinear_upsampling(size, factor):
    x = torch.randn(3, size, size + 1, dtype=torch.float64)
    torch.testing.assert_close(bilinear_matrix(size, factor, dtype=torch.float64) @ x
                               @ bilinear_matrix(size + 1, factor, dtype=torch.float64).T, _bilinear(x, factor))


@pytest.mark.parametrize("factor", [2, 4])
def test_upsampling_inside_an_image_does_not_depend_on_its_padding(factor):
    """An image of 4 x 3 cells padded to 5 x 6: its fine logits are what plain bilinear upsampling of the image
    alone gives (edge-clamped, not blended with the padding's -1e4); the padding stays padding."""
    g = torch.Generator().manual_seed(0)
    alone = torch.randn(2, 4, 3, generator=g) * 3
    padded = torch.full((2, 5, 6), PADDING_LOGIT)
    padded[:, :4, :3] = alone
    padding = torch.ones(2, 5, 6, dtype=torch.bool)
    padding[:, :4, :3] = False
    fine = upsample_mask_logits(padded, padding, factor)
    assert fine.shape == (2, 5 * factor, 6 * factor)
    torch.testing.assert_close(fine[:, : 4 * factor, : 3 * factor], _bilinear(alone, factor))
    assert (fine[:, 4 * factor :] == PADDING_LOGIT).all() and (fine[:, :, 3 * factor :] == PADDING_LOGIT).all()
    # No padding: plain bilinear; factor 1: the logits themselves.
    torch.testing.assert_close(upsample_mask_logits(alone, None, factor), _bilinear(alone, factor))
    assert upsample_mask_logits(padded, padding, 1) is padded


def _padded_image(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of two masks on an image of 4 x 3 cells padded to 5 x 6, and the padding."""
    logits = torch.full((2, 5, 6), PADDING_LOGIT)
    logits[:, :4, :3] = torch.randn(2, 4, 3, generator=g) * 3
    padding = torch.ones(2, 5, 6, dtype=torch.bool)
    padding[:, :4, :3] = False
    return logits, padding


@pytest.mark.parametrize("factor", [2, 4])
def test_points_at_fine_pixel_centres_read_the_upsampled_logits(factor):
    """At the centre of every fine pixel of the image, a point's logit is the upsampled logit there (padded or not)."""
    logits, padding = _padded_image(torch.Generator().manual_seed(2))
    fine = upsample_mask_logits(logits, padding, factor)
    rows, cols = torch.meshgrid(torch.arange(4 * factor), torch.arange(3 * factor), indexing="ij")
    xy = torch.stack([(cols + 0.5) / (6 * factor), (rows + 0.5) / (5 * factor)], -1).view(1, -1, 2).expand(2, -1, 2)
    torch.testing.assert_close(point_sample_logits(logits, padding, xy), fine[:, : 4 * factor, : 3 * factor].flatten(1))
    alone = logits[:, :4, :3]
    xy_alone = torch.stack([(cols + 0.5) / (3 * factor), (rows + 0.5) / (4 * factor)], -1).view(1, -1, 2).expand(2, -1, 2)
    torch.testing.assert_close(point_sample_logits(alone, None, xy_alone),
                               _bilinear(alone, factor).flatten(1))


def test_training_points_fall_inside_the_image_and_mostly_where_the_mask_is_uncertain():
    """Each mask's points lie inside its image (not the padding); three quarters of them lie where its logits are
    near 0 (a band of cells at 0 among cells at +-10) when the band holds enough candidates, the rest anywhere."""
    torch.manual_seed(0)
    logits = torch.where(torch.arange(16)[None, :, None] < 8, 10.0, -10.0).expand(3, 16, 16).clone()
    logits[:, 5:11] = 0.0  # rows 5 to 10: the uncertain band, 7/16 of the map where the bilinear logits are not +-10
    padding = torch.zeros(3, 16, 16, dtype=torch.bool)
    padding[2, 12:] = True  # third mask: its image is 12 rows high
    padding[2, :, 10:] = True  # and 10 columns wide
    points = sample_mask_points(logits, padding, 64)
    assert points.shape == (3, 64, 2) and (points >= 0).all()
    assert (points[:2] <= 1).all() and (points[2, :, 0] <= 10 / 16).all() and (points[2, :, 1] <= 12 / 16).all()
    uncertain = point_sample_logits(logits, padding, points).abs() < 10
    assert (uncertain[:, :48].all(1)).all()  # the 48 most uncertain of 192 candidates: all near the band
    assert (~uncertain[:, 48:]).any(1).all()  # the 16 uniform ones are not held to it


def test_criterion_takes_the_mask_terms_at_the_fine_resolution_and_matches_at_the_stride():
    """Matching on the stride's logits and soft targets; dice, BCE (per fine pixel of the image) and the varifocal
    target (IoU) of each match on the upsampled logits against the fine targets."""
    g = torch.Generator().manual_seed(1)
    factor, Q, C = 4, 5, 3
    mask_logits = torch.randn(1, 2, Q, 4, 4, generator=g) * 3
    logits = torch.randn(1, 2, Q, C, generator=g)
    fine = [(torch.rand(2, 16, 16, generator=g) > 0.5).float(), (torch.rand(1, 16, 16, generator=g) > 0.5).float()]
    small = [downsample_masks(m.bool(), (4, 4)) for m in fine]
    targets = [{"labels": torch.tensor([0, 2])}, {"labels": torch.tensor([1])}]
    cfg = LossConfig(aux_loss=False, mask_bce_weight=1.0, class_loss="varifocal", mask_loss_upsample=factor)
    losses = SetCriterion(cfg)(logits, mask_logits, targets, small, torch.tensor([16, 16]), fine_masks=fine)
    dice = bce = 0.0
    quality = torch.zeros(2, Q, C)
    for b in range(2):
        query, target = hungarian_match(logits[0, b], mask_logits[0, b].flatten(1), targets[b]["labels"],
                                        small[b].flatten(1), cfg)
        pred = _bilinear(mask_logits[0, b, query], factor).flatten(1)
        gt = fine[b][target].flatten(1)
        dice += dice_loss(pred, gt).sum()
        bce += mask_bce_loss(pred, gt, torch.full((len(query),), 256.0)).sum()
        quality[b, query, targets[b]["labels"][target]] = mask_iou(pred, gt)
    torch.testing.assert_close(losses["loss_dice"], dice / 3)
    torch.testing.assert_close(losses["loss_bce"], bce / 3)
    assert not torch.equal(losses["loss_dice"], SetCriterion(LossConfig(aux_loss=False))(
        logits, mask_logits, targets, small)["loss_dice"])
    torch.testing.assert_close(losses["loss_cls"], varifocal_loss(logits[0], quality, 0.25, 2.0).sum() / 3)
    with pytest.raises(ValueError, match="mask_loss_upsample"):
        SetCriterion(cfg)(logits, mask_logits, targets, small)


def test_criterion_takes_the_mask_terms_on_points_with_the_varifocal_iou_at_the_stride():
    """With ``loss.mask_loss_points``: dice and BCE (mean per point) of each match on its sampled points against
    its fine target's pixel under each point; the varifocal target (IoU) on the stride's logits and targets."""
    g = torch.Generator().manual_seed(3)
    factor, Q, C, K = 4, 5, 3, 32
    mask_logits = torch.randn(1, 2, Q, 4, 4, generator=g) * 3
    logits = torch.randn(1, 2, Q, C, generator=g)
    fine = [(torch.rand(2, 16, 16, generator=g) > 0.5).float(), (torch.rand(1, 16, 16, generator=g) > 0.5).float()]
    small = [downsample_masks(m.bool(), (4, 4)) for m in fine]
    targets = [{"labels": torch.tensor([0, 2])}, {"labels": torch.tensor([1])}]
    cfg = LossConfig(aux_loss=False, mask_bce_weight=1.0, class_loss="varifocal", mask_loss_upsample=factor,
                     mask_loss_points=K)
    torch.manual_seed(5)
    losses = SetCriterion(cfg)(logits, mask_logits, targets, small, torch.tensor([16, 16]), fine_masks=fine)
    quality = torch.zeros(2, Q, C)
    preds, gts = [], []
    for b in range(2):
        query, target = hungarian_match(logits[0, b], mask_logits[0, b].flatten(1), targets[b]["labels"],
                                        small[b].flatten(1), cfg)
        preds.append(mask_logits[0, b, query])
        gts.append(fine[b][target])
        quality[b, query, targets[b]["labels"][target]] = mask_iou(mask_logits[0, b, query].flatten(1),
                                                                   small[b][target].flatten(1))
    pred, gt = torch.cat(preds), torch.cat(gts)
    torch.manual_seed(5)
    xy = sample_mask_points(pred, None, K)
    on_points = point_sample_logits(pred, None, xy)
    pixel = (xy * 16).long()
    gt_points = torch.stack([gt[i, pixel[i, :, 1], pixel[i, :, 0]] for i in range(len(gt))])
    torch.testing.assert_close(losses["loss_dice"], dice_loss(on_points, gt_points).sum() / 3)
    torch.testing.assert_close(losses["loss_bce"], mask_bce_loss(on_points, gt_points, torch.full((3,), K * 1.0)).sum() / 3)
    torch.testing.assert_close(losses["loss_cls"], varifocal_loss(logits[0], quality, 0.25, 2.0).sum() / 3)


def test_the_model_hands_the_criterion_targets_at_the_fine_resolution(monkeypatch):
    """In the model, the fine targets are the images' masks (padded to the batch) at the mask stride's resolution
    times the factor: at factor = stride, the masks themselves."""
    model = tiny(**{"model.mask_stride": 4, "loss.mask_loss_upsample": 4}).train()
    seen = {}
    criterion = type(model.criterion)
    original = criterion.__call__

    def spy(self, *args, fine_masks=None, **kwargs):
        seen.setdefault("fine", fine_masks)
        return original(self, *args, fine_masks=fine_masks, **kwargs)

    monkeypatch.setattr(criterion, "__call__", spy)
    images, targets = batch()
    model(images, targets)
    for fine, t in zip(seen["fine"], targets):
        assert fine.shape[-2:] == (128, 128)  # the batch's padded size: stride 4 x factor 4
        h, w = t["masks"].shape[-2:]
        assert torch.equal(fine[:, :h, :w], t["masks"].float()) and fine[:, h:].sum() == fine[:, :, w:].sum() == 0


@pytest.mark.parametrize("overrides, field", [
    *(({"loss.mask_loss_upsample": v}, "loss.mask_loss_upsample") for v in (0, -4, 3, 8)),  # mask stride 4
    ({"loss.mask_loss_upsample": 4, "loss.mask_loss_points": -1}, "loss.mask_loss_points"),
    ({"loss.mask_loss_points": 256}, "loss.mask_loss_points"),  # points need a finer resolution
])
def test_bad_values_name_the_field(overrides, field):
    cfg = apply_overrides(get_preset("isda_tiny"), {"model.mask_stride": 4, **overrides})
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cfg.validate()
