"""The deformable attention core (both implementations, ``impl="gather"`` and ``impl="grid_sample"``) against the
textbook implementation of :mod:`benchmarks.common` (per-level ``grid_sample``), forward and backward."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds benchmarks/

from benchmarks.common import msda_problem, reference_ms_deform_attn  # noqa: E402
from isda.ops import ms_deform_attn  # noqa: E402

SMALL_LEVELS = ((9, 13), (5, 7), (3, 4), (1, 2))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("impl", ["gather", "grid_sample"])
@pytest.mark.parametrize("batch,queries", [(1, 7), (3, 5)])
def test_ms_deform_attn_matches_textbook_reference_float64(impl, batch, queries):
    value, ss, loc, w = msda_problem(queries, SMALL_LEVELS, batch=batch, heads=3, head_dim=4, points=2,
                                     dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        loc[0, 0, 0, 0, 0] = torch.tensor([0.0, 1.0], dtype=torch.float64)  # image corners, and far outside
        loc[0, -1, -1, -1, -1] = torch.tensor([3.0, -2.0], dtype=torch.float64)
    out = ms_deform_attn(value, ss, loc, w, impl=impl)
    ref = reference_ms_deform_attn(value, ss, loc, w)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (value, loc, w), g)
    want = torch.autograd.grad(ref, (value, loc, w), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_export_core_matches_textbook_reference_float64():
    """The core the ONNX export traces (level sizes as tensors), with samples on and far outside the borders."""
    from isda.ops import ms_deform_attn_traceable

    value, ss, loc, w = msda_problem(9, SMALL_LEVELS, batch=2, heads=3, head_dim=4, points=2, dtype=torch.float64)
    loc[0, 0, 0, 0, 0] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    loc[1, -1, -1, -1, -1] = torch.tensor([3.0, -2.0], dtype=torch.float64)
    loc[1, 2, 1, 2] = torch.tensor([-0.01, 1.01], dtype=torch.float64)  # just outside: one corner row inside
    torch.testing.assert_close(ms_deform_attn_traceable(value, ss, loc, w),
                               reference_ms_deform_attn(value, ss, loc, w), rtol=1e-12, atol=1e-12)


def test_ms_deform_attn_float32_at_encoder_like_size():
    value, ss, loc, w = msda_problem(2000, ((40, 60), (20, 30), (10, 15), (5, 8)))
    torch.testing.assert_close(ms_deform_attn(value, ss, loc, w), reference_ms_deform_attn(value, ss, loc, w),
                               rtol=1e-5, atol=1e-5)


def test_ms_deform_attn_gather_chunks_queries_without_grad():
    from isda.ops import gather_ms_deform_attn_pixels

    value, ss, loc, w = msda_problem(11, SMALL_LEVELS, batch=2, heads=2, head_dim=4, points=3, dtype=torch.float64)
    size = torch.tensor([[wd, h] for h, wd in SMALL_LEVELS], dtype=torch.float64).view(4, 1, 2)
    pixels = loc * size + 0.5
    whole = gather_ms_deform_attn_pixels(value, SMALL_LEVELS, pixels, w, chunk=100)
    torch.testing.assert_close(gather_ms_deform_attn_pixels(value, SMALL_LEVELS, pixels, w, chunk=3), whole,
                               rtol=0, atol=0)
    torch.testing.assert_close(whole, reference_ms_deform_attn(value, ss, loc, w), rtol=1e-12, atol=1e-12)


def test_gather_with_one_map_shared_by_all_heads():
    """value (B, S, 1, D) sampled by every head == the same map repeated per head (forward and gradients)."""
    from isda.ops import gather_ms_deform_attn_pixels

    _, ss, loc, w = msda_problem(6, SMALL_LEVELS, batch=2, heads=3, head_dim=5, points=2, dtype=torch.float64,
                                 requires_grad=True)
    shared = torch.randn(2, int((ss[:, 0] * ss[:, 1]).sum()), 1, 5, dtype=torch.float64, requires_grad=True)
    size = torch.tensor([[wd, h] for h, wd in SMALL_LEVELS], dtype=torch.float64).view(4, 1, 2)
    out = gather_ms_deform_attn_pixels(shared, SMALL_LEVELS, loc * size + 0.5, w)
    ref = reference_ms_deform_attn(shared.expand(-1, -1, 3, -1), ss, loc, w)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (shared, loc, w), g), torch.autograd.grad(ref, (shared, loc, w), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.autograd.gradcheck(lambda v, l, a: gather_ms_deform_attn_pixels(v, SMALL_LEVELS[:2], l, a),
                             (shared[:1, :152].detach().requires_grad_(), (loc[:1, :2, :, :2] * size[:2] + 0.5).detach()
                              .requires_grad_(), w[:1, :2, :, :2].detach().requires_grad_()), eps=1e-6, atol=1e-6)


def test_ms_deform_attn_gradcheck_gather():
    value, ss, loc, w = msda_problem(3, ((4, 3), (2, 2)), heads=2, head_dim=2, points=2, dtype=torch.float64,
                                     requires_grad=True)
    torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn(v, ss, l, a, impl="gather"), (value, loc, w),
                             eps=1e-6, atol=1e-6)


def test_ms_deform_attn_only_some_inputs_need_grad():
    value, ss, loc, w = msda_problem(4, SMALL_LEVELS, heads=2, head_dim=4, points=2, dtype=torch.float64)
    value.requires_grad_(True)
    out = ms_deform_attn(value, ss, loc, w)
    (gv,) = torch.autograd.grad(out.sum(), value)
    (rv,) = torch.autograd.grad(reference_ms_deform_attn(value, ss, loc, w).sum(), value)
    torch.testing.assert_close(gv, rv)
    with pytest.raises(ValueError, match="impl"):
        ms_deform_attn(value, ss, loc, w, impl="cuda_kernel")
