"""ResNet backbone (torchvision layout, so torchvision ResNet weight files load): C2..C5."""

from __future__ import annotations

import os

from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.ops import FrozenBatchNorm2d

from ..config import ModelConfig

CHANNELS = {"resnet18": (64, 128, 256, 512), "resnet34": (64, 128, 256, 512),
            "resnet50": (256, 512, 1024, 2048), "resnet101": (256, 512, 1024, 2048)}


class Backbone(nn.Module):
    """ResNet returning C2..C5 (strides 4, 8, 16, 32); the classifier head is dropped."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        norm = FrozenBatchNorm2d if cfg.backbone_norm == "frozen_bn" else nn.BatchNorm2d
        net = getattr(resnet, cfg.backbone)(weights=None, norm_layer=norm)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.name, self.out_channels = cfg.backbone, CHANNELS[cfg.backbone]
        if norm is FrozenBatchNorm2d:
            fold_frozen_batchnorm(self)
        if cfg.backbone_weights:
            self.load_torchvision_weights(cfg.backbone_weights)
        # Frozen stages (1 = stem + layer1, as in the paper): no gradients, BatchNorm statistics fixed.
        stages = [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]
        self.frozen = stages[: cfg.frozen_stages + 1] if cfg.frozen_stages > 0 else []
        for module in self.frozen:
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def load_torchvision_weights(self, path: str | os.PathLike) -> None:
        """Load a torchvision ResNet state dict (e.g. resnet50-0676ba61.pth) from a local file."""
        # Imported here: isda.weights' key tables import this module (to_torchvision_key).
        from ..weights.io import WeightsError, load_torch_file

        state = load_torch_file(path, "backbone weights file", "loadable torch state dict")
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise WeightsError(f"{path}: expected a ResNet state dict, got {type(state).__name__}")
        own = self.state_dict()
        # fc is the classifier we drop; FrozenBatchNorm2d has no num_batches_tracked.
        state = {_to_ours(k): v for k, v in state.items()
                 if not k.startswith("fc.") and (not k.endswith("num_batches_tracked") or _to_ours(k) in own)}
        missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
        unexpected = sorted(k for k in state if k not in own)
        if missing or unexpected:
            raise WeightsError(f"{path}: not a torchvision {self.name} state dict "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        bad = [k for k, v in state.items() if v.shape != own[k].shape]
        if bad:
            raise WeightsError(f"{path}: shape mismatch for {bad[0]}: file {tuple(state[bad[0]].shape)} vs model {tuple(own[bad[0]].shape)}")
        self.load_state_dict(state, strict=False)

    def forward(self, x: Tensor) -> list[Tensor]:
        c2 = self.layer1(self.stem(x))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return [c2, c3, c4, self.layer4(c4)]


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d whose affine the convolution before it applies (:class:`FrozenBNConv2d`): same
    buffers and state-dict keys, identity forward."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class FrozenBNConv2d(nn.Conv2d):
    """A convolution and the frozen BatchNorm after it as one convolution: the BatchNorm's affine is folded into
    the weights and bias at every call (one pass over the weights instead of two over the activations, forward,
    and one less backward; gradients still reach the weights). ``self.bn`` is a 1-tuple so that the BatchNorm
    stays registered where torchvision put it."""

    bn: tuple[FoldedFrozenBatchNorm2d]

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn[0]
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        bias = bn.bias - bn.running_mean * scale
        if self.bias is not None:
            bias = bias + self.bias * scale
        return self._conv_forward(x, self.weight * scale.view(-1, 1, 1, 1), bias)


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Replace every convolution directly followed (as the next child of the same parent) by a FrozenBatchNorm2d
    with a FrozenBNConv2d and a FoldedFrozenBatchNorm2d, in place (parameters and buffers shared, state-dict keys
    unchanged); returns the number of pairs folded. Covers torchvision's ResNets wherever they sit (our
    Backbone, a detection model's ``backbone.body``): in their blocks ``convN`` is registered just before
    ``bnN``, and the stem and ``downsample`` pairs are consecutive too."""
    pairs = []
    for parent in module.modules():
        children = list(parent.named_children())
        pairs += [(parent, c, b) for (c, conv), (b, bn) in zip(children, children[1:])
                  if type(conv) is nn.Conv2d and type(bn) is FrozenBatchNorm2d]
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        folded = FoldedFrozenBatchNorm2d(bn.weight.shape[0], bn.eps).to(bn.weight)  # keep dtype and device
        folded.load_state_dict(bn.state_dict())
        fused = FrozenBNConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                               conv.dilation, conv.groups, bias=conv.bias is not None)
        fused.weight, fused.bias, fused.bn = conv.weight, conv.bias, (folded,)
        setattr(parent, conv_name, fused)
        setattr(parent, bn_name, folded)
    return len(pairs)


def _to_ours(key: str) -> str:
    """torchvision ResNet key -> our key (stem modules are grouped in a Sequential)."""
    for i, name in enumerate(("conv1.", "bn1.")):
        if key.startswith(name):
            return f"stem.{i}." + key[len(name):]
    return key


def to_torchvision_key(key: str) -> str:
    for i, name in enumerate(("conv1.", "bn1.")):
        if key.startswith(f"stem.{i}."):
            return name + key[len(f"stem.{i}."):]
    return key
