"""The paper preset's initialisation is the official code's, checked by the statistics of the built model:
Xavier-uniform on every transformer weight matrix (then the deformable attentions' own init), Xavier-uniform neck
convolutions, mask-feature convolutions normal(0, 0.01), the class bias at the prior 0.01, the kernel MLP at
PyTorch's Linear default (the official head leaves it there)."""

import math

import pytest
import torch
from torch import nn

import isda
from isda.models.deformable_attention import MSDeformAttn


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return isda.build_model("isda_r50_coco")


def xavier_bound(weight: torch.Tensor) -> float:
    receptive = weight[0, 0].numel()  # 1 for a matrix, k x k for a convolution
    fan_out, fan_in = weight.shape[0] * receptive, weight.shape[1] * receptive
    return math.sqrt(6 / (fan_in + fan_out))


def assert_uniform(weight: torch.Tensor, bound: float, name: str) -> None:
    """Uniform(-bound, bound): inside the bound, standard deviation bound / sqrt(3) and mean 0 within five standard
    errors of n samples (a uniform's sample std has relative error sqrt(0.2 / n))."""
    w = weight.detach().double()
    n = w.numel()
    assert w.abs().max() <= bound * (1 + 1e-6), name
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=5 * math.sqrt(0.2 / n)), name
    assert abs(w.mean().item()) < 5 * bound / math.sqrt(3 * n), name


def test_transformer_weight_matrices_are_xavier_uniform(model):
    t = model.transformer
    checked = 0
    for name, p in [*t.encoder.named_parameters("encoder"), *t.decoder.named_parameters("decoder")]:
        if p.dim() < 2:
            continue
        if "sampling_offsets" in name or "attention_weights" in name:
            assert torch.count_nonzero(p) == 0, name  # the deformable attention's own init: zero weights
            continue
        assert_uniform(p, xavier_bound(p), name)
        checked += 1
    # Per encoder layer: value/output projections, FFN 2; per decoder layer: + self-attention in/out projections.
    assert checked == 6 * 4 + 6 * 6
    # The FFN biases keep Linear's default (the official init touches weight matrices only), LayerNorms 1 / 0.
    ffn = t.encoder[0].ffn
    assert ffn.linear1.bias.abs().max() <= 1 / math.sqrt(256) and ffn.linear1.bias.abs().max() > 0
    assert torch.all(t.encoder[0].norm.weight == 1) and torch.all(t.encoder[0].norm.bias == 0)
    assert_uniform(t.reference_points.weight, xavier_bound(t.reference_points.weight), "reference_points")
    assert torch.all(t.reference_points.bias == 0)
    assert t.level_embed.std().item() == pytest.approx(1.0, rel=0.15)
    # The learned queries are the head's embedding officially: nn.Embedding's normal(0, 1).
    assert t.query_embed.weight.std().item() == pytest.approx(1.0, rel=0.03)


def test_deformable_attention_starts_as_the_official_ring(model):
    attn = model.transformer.decoder[0].cross_attn
    assert isinstance(attn, MSDeformAttn)
    offsets = attn.sampling_offsets.bias.view(8, 4, 4, 2)
    # Head 0 looks along +x, points at radius 1..4, the same for every level.
    assert offsets[0, :, :, 0].tolist() == [[1.0, 2.0, 3.0, 4.0]] * 4 and torch.all(offsets[0, :, :, 1] == 0)
    assert torch.all(attn.attention_weights.bias == 0)
    for lin in (attn.value_proj, attn.output_proj):
        assert torch.all(lin.bias == 0)


def test_mask_feature_convolutions_are_normal_0_01(model):
    convs = [(n, m) for n, m in model.mask_features.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 1 + 2 + 3 + 1  # P2, P3 one stage each, P4 two, P5 three, the 1x1 fuse
    for name, conv in convs:
        w = conv.weight.detach().double()
        assert conv.bias is None, name  # GroupNorm follows
        assert w.std().item() == pytest.approx(0.01, rel=0.05), name
        assert abs(w.mean().item()) < 2e-3, name
    norms = [m for m in model.mask_features.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == len(convs) and all(torch.all(n.weight == 1) and torch.all(n.bias == 0) for n in norms)


def test_neck_convolutions_are_xavier_uniform(model):
    for i, conv in enumerate([*model.neck.lateral, model.neck.extra]):
        assert_uniform(conv.weight, xavier_bound(conv.weight), f"neck conv {i}")
        assert torch.all(conv.bias == 0)


def test_head_class_prior_and_default_kernel_mlp(model):
    head = model.head
    assert torch.allclose(head.class_embed.bias, torch.full((80,), -math.log(99)))
    # The official head's kernel branch keeps PyTorch's Linear default: kaiming-uniform(a=sqrt(5)), i.e.
    # uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    for lin in [m for m in head.kernel_embed if isinstance(m, nn.Linear)]:
        assert_uniform(lin.weight, 1 / math.sqrt(lin.in_features), "kernel_embed")
