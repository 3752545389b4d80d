"""MSDeformAttn: projecting the values after sampling (the decoder's CPU path) computes what projecting the
whole map first does, for the module and for the whole model; the decoder picks it at a realistic size."""

from __future__ import annotations

import pytest
import torch

import isda
from isda.models.deformable_attention import MSDeformAttn

SMALL_LEVELS = ((9, 13), (5, 7), (3, 4), (1, 2))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("padded", [False, True])
def test_attention_projecting_after_sampling_equals_projecting_before(padded):
    """MSDeformAttn's decoder path (value_proj applied to the sampled input rows) vs the encoder path
    (value_proj on the whole map, then sampling): same outputs and gradients."""
    torch.manual_seed(0)
    attn = MSDeformAttn(dim=64, num_levels=4, num_heads=4, num_points=3)
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.3)
    torch.nn.init.normal_(attn.attention_weights.weight, std=0.3)
    torch.nn.init.normal_(attn.value_proj.bias, std=0.5)
    ss = torch.tensor(SMALL_LEVELS)
    S = int((ss[:, 0] * ss[:, 1]).sum())
    query, value = torch.randn(2, 7, 64), torch.randn(2, S, 64)
    ref_points = torch.rand(2, 7, 4, 2)
    mask = torch.zeros(2, S, dtype=torch.bool)
    if padded:
        mask[1, ::3] = True
    results = []
    for after in (True, False):
        attn.project_after = after
        attn.zero_grad()
        v = value.clone().requires_grad_(True)
        out = attn(query, ref_points, v, ss, mask)
        out.pow(2).sum().backward()
        results.append((out.detach(), v.grad, {n: p.grad.clone() for n, p in attn.named_parameters()}))
    (o1, gv1, gp1), (o2, gv2, gp2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gv1, gv2, rtol=1e-4, atol=1e-5)
    for n in gp1:
        torch.testing.assert_close(gp1[n], gp2[n], rtol=1e-4, atol=1e-4, msg=n)


@pytest.mark.parametrize("sizes", [[(192, 256)], [(45, 70), (96, 80)]], ids=["unpadded", "padded_batch"])
def test_model_predicts_the_same_whichever_way_attention_projects(sizes):
    torch.manual_seed(0)
    model = isda.build_model("isda_tiny", num_classes=3).eval()
    images = [torch.rand(3, *s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(sizes)]
    attentions = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    outputs = []
    for after in (True, False):
        for attn in attentions:
            attn.project_after = after
        with torch.no_grad():
            outputs.append(model.forward_features(*model.batch_images(images)))
    for key in ("logits", "mask_logits", "memory", "hidden"):
        torch.testing.assert_close(outputs[0][key], outputs[1][key], rtol=1e-4, atol=1e-4)


def test_decoder_projects_after_sampling_on_a_large_map(monkeypatch):
    """By default (``project_after`` None) the decoder's few queries on a large map sample the input map."""
    torch.manual_seed(0)
    model = isda.build_model("isda_tiny", num_classes=3).eval()
    calls = []
    original = MSDeformAttn._gather_then_project
    monkeypatch.setattr(MSDeformAttn, "_gather_then_project", lambda self, *a: calls.append(1) or original(self, *a))
    with torch.no_grad():
        model([torch.rand(3, 192, 256)])
    assert len(calls) == model.cfg.dec_layers
