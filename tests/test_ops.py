"""ms_deform_attn against an independent dense (gather-based) bilinear reference, in float64."""

import pytest
import torch

from isda.ops import ms_deform_attn, ms_deform_attn_traceable


def reference_ms_deform_attn(value, spatial_shapes, locations, weights):
    """Explicit bilinear interpolation: four corners gathered by index, zero outside the map."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    out = value.new_zeros(B, Q, M, D)
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        v = value[:, start:start + h * w]  # (B, h*w, M, D)
        start += h * w
        x = locations[:, :, :, lvl, :, 0] * w - 0.5  # pixel centres at integer coordinates
        y = locations[:, :, :, lvl, :, 1] * h - 0.5
        x0, y0 = x.floor(), y.floor()
        for dx in (0, 1):
            for dy in (0, 1):
                xi, yi = x0 + dx, y0 + dy
                corner_w = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
                inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long()  # (B, Q, M, P)
                heads = torch.arange(M).view(1, 1, M, 1).expand_as(idx)
                batch = torch.arange(B).view(B, 1, 1, 1).expand_as(idx)
                gathered = v[batch, idx, heads]  # (B, Q, M, P, D)
                coef = (corner_w * inside * weights[:, :, :, lvl]).unsqueeze(-1)
                out = out + (gathered * coef).sum(3)
    return out.reshape(B, Q, M * D)


def random_problem(shapes, B=2, Q=5, M=2, D=3, P=3, spread=0.2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    S = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    L = len(shapes)
    value = torch.randn(B, S, M, D, generator=g, dtype=dtype)
    # Locations spread beyond [0, 1] so some samples fall partly or fully outside the map.
    loc = torch.rand(B, Q, M, L, P, 2, generator=g, dtype=dtype) * (1 + 2 * spread) - spread
    weights = torch.rand(B, Q, M, L, P, generator=g, dtype=dtype)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return value, spatial_shapes, loc, weights


@pytest.mark.parametrize("core", [ms_deform_attn, ms_deform_attn_traceable])  # the latter: ONNX export's core
@pytest.mark.parametrize("shapes", [[(6, 4), (3, 5), (2, 2), (1, 3)], [(7, 7)], [(4, 9), (1, 1)]])
def test_matches_dense_reference(shapes, core):
    value, ss, loc, w = random_problem(shapes)
    assert (loc < 0).any() and (loc > 1).any()  # the problem really tests out-of-map points
    expected = reference_ms_deform_attn(value, ss, loc, w)
    got = core(value, ss, loc, w)
    assert got.shape == (2, 5, 2 * 3)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("core", [ms_deform_attn, ms_deform_attn_traceable])
@pytest.mark.parametrize("axis, position", [(0, 1.5), (1, 1.8), (1, -0.9)])
def test_points_fully_outside_give_zero(core, axis, position):
    # Far right, far below, far above every level: in the export core's stacked canvas these positions would
    # land in a neighbouring level's block without the clamp to each level's zero frame.
    value, ss, loc, w = random_problem([(5, 3), (2, 4), (3, 2)])
    loc = loc.clone()
    loc[..., axis] = position
    assert core(value, ss, loc, w).abs().max() == 0


def test_gradients_match_reference_and_gradcheck():
    value, ss, loc, w = random_problem([(5, 3), (2, 4)], B=1, Q=3, seed=1)
    # Keep samples off exact pixel centres where bilinear interpolation is not differentiable.
    inputs = [t.clone().requires_grad_(True) for t in (value, loc, w)]
    torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn(v, ss, l, a), inputs, eps=1e-6, atol=1e-6)
    ref_inputs = [t.clone().requires_grad_(True) for t in (value, loc, w)]
    g = torch.randn(1, 3, 6, dtype=torch.float64)
    ms_deform_attn(inputs[0], ss, inputs[1], inputs[2]).backward(g)
    reference_ms_deform_attn(ref_inputs[0], ss, ref_inputs[1], ref_inputs[2]).backward(g)
    for a, b in zip(inputs, ref_inputs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)


def test_shape_errors_are_clear():
    value, ss, loc, w = random_problem([(5, 3), (2, 4)])
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, torch.tensor([[5, 3], [2, 5]]), loc, w)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, ss, loc, w[:, :, :, :1])
