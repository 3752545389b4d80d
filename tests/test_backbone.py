"""Backbone: the frozen BatchNorm folded into the convolutions computes torchvision's ResNet exactly."""

import copy

import pytest
import torch
from torchvision.models import resnet
from torchvision.ops import FrozenBatchNorm2d

from isda.models.backbone import Backbone, FoldedFrozenBatchNorm2d, FrozenBNConv2d, _to_ours, fold_frozen_batchnorm
from isda.config import ModelConfig


def _reference_and_ours(name: str) -> tuple[torch.nn.Module, Backbone]:
    torch.manual_seed(0)
    ref = getattr(resnet, name)(weights=None, norm_layer=FrozenBatchNorm2d)
    for m in ref.modules():  # non-trivial statistics and affines, as in ImageNet weights
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2)
            m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
    ours = Backbone(ModelConfig(backbone=name, frozen_stages=1))
    ours.load_state_dict({_to_ours(k): v for k, v in ref.state_dict().items() if not k.startswith("fc.")})
    return ref, ours


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_folded_frozen_batchnorm_equals_torchvision_resnet(name):
    ref, ours = _reference_and_ours(name)
    assert sum(isinstance(m, FrozenBNConv2d) for m in ours.modules()) == sum(
        isinstance(m, FrozenBatchNorm2d) for m in ref.modules())
    assert all(isinstance(m, FoldedFrozenBatchNorm2d) for m in ours.modules() if isinstance(m, FrozenBatchNorm2d))
    # State-dict keys unchanged: torchvision weight files still load, checkpoints keep their layout.
    assert set(ours.state_dict()) == {_to_ours(k) for k in ref.state_dict() if not k.startswith("fc.")}
    # float64: the fold reorders float rounding only, so the two agree to rounding error.
    ours, ref = ours.double().train(), ref.double().train()
    x = torch.randn(2, 3, 96, 128, dtype=torch.float64)
    c5 = ours(x)[-1]
    expected = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
    torch.testing.assert_close(c5, expected, rtol=1e-9, atol=1e-9)
    # Gradients reach the (trainable) convolution weights through the fold, as through the BatchNorm.
    c5.square().mean().backward()
    expected.square().mean().backward()
    torch.testing.assert_close(ours.layer4[0].conv1.weight.grad, ref.layer4[0].conv1.weight.grad, rtol=1e-9, atol=1e-12)
    assert ours.stem[0].weight.grad is None  # frozen stage


def test_fold_applies_to_any_module_tree_holding_a_torchvision_resnet():
    """The fold the benchmarks give Mask R-CNN too: a torchvision ResNet inside a detection backbone (every pair
    found, the outputs unchanged, a second fold a no-op)."""
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    ref, _ = _reference_and_ours("resnet18")
    detector_backbone = _resnet_fpn_extractor(ref, 3).double().eval()
    folded = copy.deepcopy(detector_backbone)
    assert fold_frozen_batchnorm(folded) == sum(isinstance(m, FrozenBatchNorm2d) for m in ref.modules()) == 20
    assert fold_frozen_batchnorm(folded) == 0
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    expected, got = detector_backbone(x), folded(x)
    assert list(got) == list(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-9, atol=1e-9)
