"""ISDA model: API, shapes, the paper preset's sizes, padding invariance, input validation."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50
from torchvision.ops import FrozenBatchNorm2d

import isda
from isda.config import ConfigError
from isda.models.head import apply_kernels, mask_padding


def tiny(**overrides):
    torch.manual_seed(0)
    return isda.build_model("isda_tiny", num_classes=3, **overrides)


@pytest.mark.parametrize("mp,kp,stride", list(itertools.product([True, False], [True, False], [8, 4, 2])))
def test_output_shapes_for_every_ablation(mp, kp, stride):
    model = tiny(mask_position=mp, kernel_position=kp, mask_stride=stride).eval()
    images = [torch.rand(3, 70, 90), torch.rand(3, 64, 50)]
    with torch.no_grad():
        feats = model.forward_features(*model.batch_images(images))
        preds = model(images)
    cfg = model.cfg
    assert feats["mask_logits"].shape == (1, 2, cfg.num_queries, 96 // stride, 96 // stride)
    assert feats["logits"].shape == (cfg.dec_layers, 2, cfg.num_queries, 3)
    for im, p in zip(images, preds):
        k = cfg.num_detections
        assert p["masks"].shape == (k, *im.shape[1:]) and p["masks"].dtype == torch.bool
        assert p["scores"].shape == (k,) and p["labels"].dtype == torch.int64
        assert p["boxes"].shape == (k, 4)
        assert bool((p["scores"][:-1] >= p["scores"][1:]).all())
    # MP really adds the two coordinate channels to the 1/32 branch's first conv; KP shrinks the MLP output.
    first = model.mask_features.branches[-1][0].conv
    assert first.in_channels == cfg.hidden_dim + (2 if mp else 0)
    assert model.head.kernel_embed[-1].out_features == cfg.mask_out_channels - (2 if kp else 0)


def test_training_returns_losses_for_every_decoder_layer_and_empty_images():
    model = tiny().train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 80, 48)]
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 5:30, 5:30] = masks[1, 30:60, 20:50] = True
    targets = [{"labels": torch.tensor([0, 2]), "masks": masks},
               {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 80, 48, dtype=torch.bool)}]
    losses = model(images, targets)
    L = model.cfg.dec_layers
    weights = {"cls": 2.0, "dice": 3.0, "bce": 3.0, "point": 5.0}  # the tiny preset: + mask BCE, point refinement
    per_layer = {f"{p}loss_{k}" for p in ["", *(f"d{i}." for i in range(L - 1))] for k in weights}
    # The preset trains with query denoising: the same losses again on the noised copies of the instances.
    assert {"loss"} | per_layer | {f"dn.{k}" for k in per_layer} == set(losses)
    dn = model.criterion.cfg.denoising_weight
    expected = sum((dn if k.startswith("dn.") else 1.0) * weights[k.rpartition("_")[2]] * v
                   for k, v in losses.items() if k != "loss")
    torch.testing.assert_close(losses["loss"], expected)
    losses["loss"].backward()
    assert model.head.kernel_embed[0].weight.grad.abs().sum() > 0
    assert model.transformer.reference_points.weight.grad.abs().sum() > 0


def expected_r50_parameter_count(num_classes=80):
    """Counted from the paper's sizes, independently of the model code (torchvision for the ResNet)."""
    d, heads, levels, points, ffn, queries, mfr, kernel = 256, 8, 4, 4, 1024, 300, 128, 256
    backbone = sum(p.numel() for n, p in resnet50(norm_layer=FrozenBatchNorm2d).named_parameters() if not n.startswith("fc."))
    frozen = sum(p.numel() for m in (lambda r: [r.conv1, r.bn1, r.layer1])(resnet50(norm_layer=FrozenBatchNorm2d))
                 for p in m.parameters())
    neck = sum(c * d + d + 2 * d for c in (256, 512, 1024, 2048)) + 2048 * 9 * d + d + 2 * d
    msda = (d * heads * levels * points * 2 + heads * levels * points * 2) + (d * heads * levels * points + heads * levels * points) + 2 * (d * d + d)
    ffn_p = d * ffn + ffn + ffn * d + d + 2 * d
    enc = msda + 2 * d + ffn_p
    dec = (4 * d * d + 4 * d) + 2 * d + msda + 2 * d + ffn_p
    transformer = levels * d + 6 * enc + 6 * dec + queries * 2 * d + 2 * d + 2
    conv = lambda cin: cin * mfr * 9 + 2 * mfr  # noqa: E731  3x3 conv (no bias) + GN
    mask_features = conv(d) + conv(d) + conv(d) + conv(mfr) + conv(d + 2) + 2 * conv(mfr) + mfr * kernel + 2 * kernel
    head = d * num_classes + num_classes + 2 * (d * d + d) + d * (kernel - 2) + kernel - 2
    return backbone + neck + transformer + mask_features + head, frozen


def test_r50_coco_preset_has_the_official_sizes_and_runs_at_800x1216():
    torch.manual_seed(0)
    model = isda.build_model("isda_r50_coco").eval()
    cfg = model.cfg
    assert (cfg.backbone, cfg.hidden_dim, cfg.num_heads, cfg.num_levels, cfg.num_points) == ("resnet50", 256, 8, 4, 4)
    assert (cfg.enc_layers, cfg.dec_layers, cfg.ffn_dim, cfg.dropout, cfg.num_queries, cfg.num_detections) == (6, 6, 1024, 0.1, 300, 100)
    assert (cfg.mask_feat_channels, cfg.mask_out_channels, cfg.mask_stride, cfg.num_classes) == (128, 256, 4, 80)
    assert isinstance(model.backbone.stem[1], FrozenBatchNorm2d)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected, frozen = expected_r50_parameter_count()
    print(f"isda_r50_coco parameters: {total:,} ({trainable:,} trainable)")
    assert total == expected
    assert trainable == total - frozen  # stem + stage 1 frozen
    with torch.no_grad():
        (pred,) = model([torch.rand(3, 800, 1216)])
    assert pred["masks"].shape == (100, 800, 1216) and pred["scores"].shape == (100,)


class PerImageBackbone(nn.Module):
    """Test double: each image's backbone features computed on that image alone (padded to its own
    multiple of 32), then zero-padded into the batch. CNN backbones are not padding invariant (no
    detector's is); everything after them must be, and this isolates that part."""

    def __init__(self, inner, sizes):
        super().__init__()
        self.inner, self.sizes, self.out_channels = inner, sizes, inner.out_channels

    def forward(self, x):
        per_image = []
        for i, (h, w) in enumerate(self.sizes):
            H, W = -(-h // 32) * 32, -(-w // 32) * 32
            per_image.append(self.inner(x[i : i + 1, :, :H, :W]))
        return [torch.cat([F.pad(f[lvl], (0, ref.shape[-1] - f[lvl].shape[-1], 0, ref.shape[-2] - f[lvl].shape[-2]))
                           for f in per_image]) for lvl, ref in enumerate(self.inner(x))]


@pytest.mark.parametrize("query_selection", [False, True])
def test_padding_does_not_change_predictions(query_selection):
    model = tiny(query_selection=query_selection).eval()
    small, large = torch.rand(3, 75, 90), torch.rand(3, 150, 170)
    inner = model.backbone
    with torch.no_grad():
        model.backbone = PerImageBackbone(inner, [small.shape[1:]])
        alone = model.forward_features(*model.batch_images([small]))
        pred_alone = model([small])[0]
        model.backbone = PerImageBackbone(inner, [small.shape[1:], large.shape[1:]])
        batch, mask = model.batch_images([small, large])
        together = model.forward_features(batch, mask)
        pred_together = model([small, large])[0]
        ignored = model.forward_features(batch, torch.zeros_like(mask))  # negative control: no padding mask
    h, w = alone["mask_logits"].shape[-2:]
    torch.testing.assert_close(together["memory"][:1, :0], alone["memory"][:, :0])
    torch.testing.assert_close(together["logits"][:, :1], alone["logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together["mask_logits"][:, :1, :, :h, :w], alone["mask_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together["reference_points"][:1], alone["reference_points"])
    assert not torch.allclose(ignored["logits"][:, :1], alone["logits"], atol=1e-3)
    assert torch.equal(pred_alone["labels"], pred_together["labels"])
    torch.testing.assert_close(pred_alone["scores"], pred_together["scores"], atol=1e-4, rtol=1e-4)
    assert (pred_alone["masks"] != pred_together["masks"]).float().mean() < 1e-3


@pytest.mark.parametrize("images,targets,match", [
    ([torch.rand(3, 32, 32).to(torch.uint8)], None, "float tensor"),
    ([torch.rand(1, 32, 32)], None, r"\[3, H, W\]"),
    ([], None, "non-empty"),
    ([torch.rand(3, 32, 32)], [{"labels": torch.tensor([0]), "masks": torch.ones(1, 16, 32, dtype=torch.bool)}], "image size"),
    ([torch.rand(3, 32, 32)], [{"labels": torch.tensor([7]), "masks": torch.ones(1, 32, 32, dtype=torch.bool)}], "out of range"),
    ([torch.rand(3, 32, 32)], [{"labels": torch.tensor([0.0]), "masks": torch.ones(1, 32, 32, dtype=torch.bool)}], "int64"),
    ([torch.rand(3, 32, 32)], [{"labels": torch.tensor([0]), "masks": torch.ones(1, 32, 32)}], "bool"),
    ([torch.rand(3, 32, 32)], [], "targets"),
])
def test_invalid_input_raises_clear_value_error(images, targets, match):
    model = tiny().train(targets is not None)
    with pytest.raises(ValueError, match=match):
        model(images, targets)


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="mask_stride"):
        isda.build_model("isda_tiny", mask_stride=16)
    with pytest.raises(ConfigError, match="unknown model option 'nonsense'"):
        isda.build_model("isda_tiny", nonsense=1)
    with pytest.raises(ConfigError, match="unknown preset"):
        isda.build_model("isda_huge")


def test_backbone_weights_round_trip(tmp_path):
    reference = resnet50()
    torch.nn.init.normal_(reference.layer3[2].conv2.weight)  # make sure no tensor happens to equal the init
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    model = isda.build_model("isda_r50_coco", backbone_weights=str(path), backbone_norm="bn")
    ours = model.backbone.state_dict()
    theirs = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    from isda.models.backbone import to_torchvision_key
    assert {to_torchvision_key(k) for k in ours} == set(theirs)
    for k, v in ours.items():
        assert torch.equal(v, theirs[to_torchvision_key(k)]), k
    # The frozen-BN paper preset loads the same file (num_batches_tracked is dropped).
    frozen = isda.build_model("isda_r50_coco", backbone_weights=str(path)).backbone
    assert torch.equal(frozen.stem[1].running_var, reference.bn1.running_var)


def test_backbone_weights_errors_name_the_file(tmp_path):
    from isda.weights import WeightsError
    with pytest.raises(WeightsError, match="not found"):
        isda.build_model("isda_tiny", backbone_weights=str(tmp_path / "missing.pth"))
    bad = tmp_path / "truncated.pth"
    torch.save(resnet50().state_dict(), bad)
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="truncated.pth"):
        isda.build_model("isda_tiny", backbone_weights=str(bad))
    r50 = tmp_path / "r50.pth"
    torch.save(resnet50().state_dict(), r50)
    with pytest.raises(WeightsError, match="r50.pth"):
        isda.build_model("isda_tiny", backbone_weights=str(r50))  # resnet18 model, resnet50 file


def test_padding_does_not_change_the_training_loss():
    """Each image's loss is the same alone or padded next to a larger image (the dice loss and the matcher
    must not see the padded pixels). Denoising off: its noise is drawn per batch."""
    model = tiny(denoising_groups=0).train()
    small, large = torch.rand(3, 75, 90), torch.rand(3, 150, 170)
    targets = []
    for im, boxes in ((small, [(5, 40, 10, 50), (30, 70, 50, 85)]), (large, [(20, 100, 30, 120)])):
        masks = torch.zeros(len(boxes), *im.shape[1:], dtype=torch.bool)
        for m, (y0, y1, x0, x1) in zip(masks, boxes):
            m[y0:y1, x0:x1] = True
        targets.append({"labels": torch.arange(len(boxes)), "masks": masks})
    inner = model.backbone.eval()  # running BatchNorm statistics: the backbone is the same per image

    def loss(images, tgts):
        model.backbone = PerImageBackbone(inner, [im.shape[1:] for im in images])
        with torch.no_grad():
            return model(images, tgts)["loss"].item()

    alone = [loss([small], targets[:1]), loss([large], targets[1:])]
    together = loss([small, large], targets)
    # The loss is normalised by the number of instances in the batch: 2 and 1 alone, 3 together.
    assert together == pytest.approx((2 * alone[0] + 1 * alone[1]) / 3, rel=1e-4)


@pytest.mark.parametrize("overrides", [{}, {"hybrid_queries": 20}, {"mask_mlp_hidden": 4}])
def test_matched_mask_gradients_equal_backpropagating_through_every_mask(overrides):
    """Training computes all masks without autograd and the losses compute the matched ones again with it; the
    losses and every parameter's gradient equal those of backpropagating through every query's mask (padded batch, empty
    image, one-to-many branch, the per-query two-layer mask head)."""
    model = tiny(**overrides).train()
    if model.head.mlp_embed is not None:  # its output weights start at zero: give every part of it a gradient
        torch.nn.init.normal_(model.head.mlp_embed.weight, std=0.05)
    images = [torch.rand(3, 64, 64), torch.rand(3, 80, 48), torch.rand(3, 40, 40)]
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 5:30, 5:30] = masks[1, 30:60, 20:50] = True
    other = torch.zeros(1, 80, 48, dtype=torch.bool)
    other[0, 10:70, 5:40] = True
    targets = [{"labels": torch.tensor([0, 2]), "masks": masks}, {"labels": torch.tensor([1]), "masks": other},
               {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 40, 40, dtype=torch.bool)}]
    results = []
    for matched in (True, False):
        model.zero_grad()
        batch, mask = model.batch_images(images)
        out = model.forward_features(batch, mask)
        if not matched:  # every query's masks with autograd: the criterion indexes them
            out["mask_logits"] = mask_padding(apply_kernels(out["kernels"], out["mask_features"]),
                                              out["padding_mask"][None, :, None])
        losses = model.losses(out, targets, batch.shape[-2:])
        losses["loss"].backward()
        results.append((losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (fast, fast_grads), (full, full_grads) = results
    assert fast.keys() == full.keys() and fast_grads.keys() == full_grads.keys()
    for k in fast:
        torch.testing.assert_close(fast[k], full[k], rtol=1e-5, atol=1e-6)
    assert fast_grads["mask_features.fuse.conv.weight"].abs().sum() > 0
    for n in fast_grads:
        torch.testing.assert_close(fast_grads[n], full_grads[n], rtol=1e-4, atol=1e-5, msg=n)
