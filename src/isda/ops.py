"""Multi-scale deformable attention core (pure PyTorch: CPU, CUDA and MPS, no compiled extension).

Two implementations of the same function, chosen by device (``impl="auto"``):

* ``"gather"`` (CPU default): every bilinear sample is 4 weighted rows of a channels-last value table,
  so the whole op is one weighted gather-sum, ``F.embedding_bag(mode="sum")`` over bags of
  ``4 * levels * points`` rows per (batch, query, head). Each row is ``head_dim`` contiguous floats
  (grid_sample reads each channel from a different plane), the weighted sum over levels, points and
  corners happens inside the kernel (no ``sampled * weights`` temporaries) and the output comes out in
  the ``(B, Q, heads * head_dim)`` layout directly. Each level is stored with a zero border (1 pixel
  before, 2 after), so clamping the continuous coordinate replaces the per-corner bounds checks, and
  queries go through in chunks (cache-sized temporaries). The backward (:class:`_GatherMSDeformAttn`)
  recomputes the corners instead of keeping them, takes the value gradient as the transposed gather (one
  stable sort of the samples' top-left rows, then ``embedding_bag`` per corner), the corner-weight
  gradient as a sampled dense-dense product, and the location / weight gradients in closed form.
* ``"grid_sample"`` (other devices): ``F.grid_sample`` per level with the heads folded into the batch.

Both agree with a dense float64 reference to ~1e-12 (tests/test_ops.py, tests/test_ops_reference.py).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

IMPLS = ("auto", "gather", "grid_sample")


def ms_deform_attn(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor,
    impl: str = "auto",
) -> Tensor:
    """Bilinearly sample each level's value map at the sampling locations and sum with the weights.

    Deformable-DETR convention:
      value: (B, S, heads, head_dim), S = sum(H_l * W_l) in level order (row-major per level).
      spatial_shapes: (L, 2) int64 rows (H_l, W_l).
      sampling_locations: (B, Q, heads, L, P, 2) normalized (x, y) in [0, 1] (outside samples zero).
      attention_weights: (B, Q, heads, L, P).
      impl: "auto" (gather on CPU, grid_sample elsewhere), "gather" or "grid_sample".
    Returns (B, Q, heads * head_dim).
    """
    B, S, M, D = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be (B, Q, heads, L, P, 2), got {tuple(sampling_locations.shape)}")
    _, Q, _, L, P, _ = sampling_locations.shape
    if sampling_locations.shape[:3] != (B, Q, M) or attention_weights.shape != (B, Q, M, L, P):
        raise ValueError(
            f"shape mismatch: value {tuple(value.shape)}, sampling_locations {tuple(sampling_locations.shape)}, "
            f"attention_weights {tuple(attention_weights.shape)}"
        )
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if len(shapes) != L or sum(h * w for h, w in shapes) != S:
        raise ValueError(f"spatial_shapes {shapes} do not describe {L} levels with {S} value tokens")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "gather" or (impl == "auto" and value.device.type == "cpu"):
        return _gather_ms_deform_attn(value, shapes, sampling_locations, attention_weights)
    return _grid_sample_ms_deform_attn(value, shapes, sampling_locations, attention_weights)


def ms_deform_attn_traceable(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                             attention_weights: Tensor) -> Tensor:
    """:func:`ms_deform_attn` for ONNX export: the grid_sample implementation (ONNX GridSample, opset 16+) with
    the level sizes taken from ``spatial_shapes`` as tensors, so that a trace keeps them as graph values and
    the exported graph takes any image size (the checks and ``.tolist()`` above would freeze the sizes)."""
    levels = sampling_locations.shape[3]
    shapes = [(spatial_shapes[lvl, 0], spatial_shapes[lvl, 1]) for lvl in range(levels)]
    return _grid_sample_ms_deform_attn(value, shapes, sampling_locations, attention_weights, points_major=True)


# ---- grid_sample implementation ------------------------------------------------------------------

def _grid_sample_ms_deform_attn(value: Tensor, shapes: list[tuple[int | Tensor, int | Tensor]], sampling_locations: Tensor,
                                attention_weights: Tensor, points_major: bool = False) -> Tensor:
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    # grid_sample wants (N, C, H, W) maps and (N, H_out, W_out, 2) grids in [-1, 1]; heads fold into N. The grid is
    # (queries, points), or with ``points_major`` (points, queries): the weighted sum over points then adds P whole
    # rows of Q samples instead of reducing runs of P = 4 values, faster in ONNX Runtime (docs/onnx.md), the export's
    # layout; other devices keep the layout their figures were measured with.
    order = (0, 2, 3, 4, 1) if points_major else (0, 2, 1, 3, 4)  # (B, M, L, P, Q) or (B, M, Q, L, P)
    grids = (2 * sampling_locations - 1).permute(*order, 5).flatten(0, 1)
    weights = attention_weights.permute(*order).flatten(0, 1).unsqueeze(1)
    values = value.flatten(2).transpose(1, 2).reshape(B * M, D, S)  # (B*M, D, S)
    out = value.new_zeros(B * M, D, Q)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        v = values[:, :, start : start + h * w].reshape(B * M, D, h, w)
        start += h * w
        grid, weight = (grids[:, lvl], weights[:, :, lvl]) if points_major else (grids[:, :, lvl], weights[:, :, :, lvl])
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # Accumulate per level instead of stacking levels: peak memory of one level's samples.
        out = out + (sampled * weight).sum(2 if points_major else -1)
    return out.view(B, M * D, Q).transpose(1, 2).contiguous()


# ---- gather (embedding_bag) implementation ---------------------------------------------------------

def _gather_ms_deform_attn(value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor,
                           attention_weights: Tensor) -> Tensor:
    L, P = sampling_locations.shape[3:5]
    size = sampling_locations.new_tensor([[w, h] for h, w in shapes]).view(L, 1, 2).expand(L, P, 2).contiguous()
    # Pixel coordinates with pixel centres at integers, shifted by the 1-pixel zero border.
    pixels = torch.addcmul(sampling_locations.new_full((), 0.5), sampling_locations, size)
    return gather_ms_deform_attn_pixels(value, shapes, pixels, attention_weights)


def gather_ms_deform_attn_pixels(value: Tensor, shapes: list[tuple[int, int]], pixels: Tensor,
                                 attention_weights: Tensor, chunk: int = 8192) -> Tensor:
    """The gather implementation, from sampling positions in *border pixels*: ``x * W_l + 0.5`` (and
    ``y * H_l + 0.5``) for a normalized (x, y), i.e. pixel centres at 1..W_l. Callers that have pixel
    offsets (:class:`isda.deformable_attention.MSDeformAttn`) skip the normalization round trip.
    ``value`` is (B, S, heads, D) as for :func:`ms_deform_attn`, or (B, S, 1, D): one map that every
    head samples (the output is then (B, Q, heads * D)). Queries are processed ``chunk`` at a time
    (cache-sized temporaries)."""
    shapes = tuple((int(h), int(w)) for h, w in shapes)
    pixels, attention_weights = pixels.to(value.dtype), attention_weights.to(value.dtype)
    if torch.is_grad_enabled() and (value.requires_grad or pixels.requires_grad or attention_weights.requires_grad):
        return _GatherMSDeformAttn.apply(value, pixels, attention_weights, shapes, chunk)
    return _gather_forward(value, pixels, attention_weights, shapes, chunk)


def _gather_forward(value: Tensor, pixels: Tensor, attn: Tensor, shapes: tuple[tuple[int, int], ...],
                    chunk: int) -> Tensor:
    B, S, Mv, D = value.shape
    M = pixels.shape[2]
    table, rows, starts = _value_table(value, shapes)
    outs = []
    for q0 in range(0, pixels.shape[1], chunk):
        idx, weights, _, _ = _corners(pixels[:, q0 : q0 + chunk], attn[:, q0 : q0 + chunk], shapes, rows, starts, Mv)
        outs.append(F.embedding_bag(idx, table, per_sample_weights=weights, mode="sum").view(B, -1, M * D))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def _value_table(value: Tensor, shapes: tuple[tuple[int, int], ...]) -> tuple[Tensor, int, list[int]]:
    """(B, S, M, D) -> channels-last table (B * rows * M, D), row (b * rows + padded pixel) * M + head, each
    level with a zero border (1 pixel before, 2 after in x and y); returns it, rows, level start rows."""
    B, S, M, D = value.shape
    padded = [(h + 3) * (w + 3) for h, w in shapes]
    starts = [sum(padded[:i]) for i in range(len(shapes))]
    rows = sum(padded)
    table = value.new_zeros(B, rows, M * D)
    start = 0
    for (h, w), p0, n in zip(shapes, starts, padded):
        table[:, p0 : p0 + n].view(B, h + 3, w + 3, M * D)[:, 1 : h + 1, 1 : w + 1] = \
            value[:, start : start + h * w].reshape(B, h, w, M * D)
        start += h * w
    return table.view(B * rows * M, D), rows, starts


def _corner_offsets(shapes: tuple[tuple[int, int], ...], M: int) -> list[list[int]]:
    """Table-row offset of each bilinear corner (y, x) = 00, 01, 10, 11 from the top-left one, per level."""
    return [[0, M, (w + 3) * M, (w + 4) * M] for _, w in shapes]


def _corners(pixels: Tensor, attn: Tensor, shapes: tuple[tuple[int, int], ...], rows: int, starts: list[int],
             table_heads: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Table rows (B*Q*M, 4*L*P) and weights of every sample's 4 bilinear corners (corner order (y, x): 00,
    01, 10, 11, then level, point), the fractional positions (B, Q, M, L, P, 2) and the top-left rows
    (B, Q, M, L, P). ``table_heads``: M (a value map per head) or 1 (one map shared by every head)."""
    B, Q, M, L, P, _ = pixels.shape
    Mv = table_heads
    dev, dtype = pixels.device, pixels.dtype
    itype = torch.int32 if B * rows * Mv < 2**31 - 1 else torch.int64
    # Per-(level, point, axis) constants, expanded so that every elementwise op below runs over a
    # contiguous inner block (L * P [* 2]) instead of broadcasting inside a 2-element dimension.
    hi = torch.tensor([[w + 1, h + 1] for h, w in shapes], dtype=dtype, device=dev).view(L, 1, 2).expand(L, P, 2)
    xy = torch.clamp(pixels, torch.zeros_like(hi), hi.contiguous())
    xy0 = xy.floor()
    frac = xy.sub_(xy0)  # weight of the +1 corner along x and y
    ixy = xy0.to(itype)
    fx, fy = frac[..., 0], frac[..., 1]

    row = torch.tensor([(w + 3) * Mv for _, w in shapes], dtype=itype, device=dev).view(L, 1).expand(L, P)
    head = torch.arange(M, dtype=itype, device=dev) if Mv == M else torch.zeros(M, dtype=itype, device=dev)
    base = ((torch.arange(B, dtype=itype, device=dev).view(B, 1, 1, 1) * rows
             + torch.tensor(starts, dtype=itype, device=dev).view(1, 1, L, 1)) * Mv
            + head.view(1, M, 1, 1)).expand(B, M, L, P).unsqueeze(1)
    top_left = ixy[..., 1] * row.contiguous()  # (B, Q, M, L, P)
    top_left.add_(ixy[..., 0], alpha=Mv).add_(base.contiguous())
    corner = torch.tensor(_corner_offsets(shapes, Mv), dtype=itype, device=dev).t()  # (4, L)
    idx = torch.empty(B, Q, M, 4, L, P, dtype=itype, device=dev)
    torch.add(top_left.unsqueeze(3), corner.unsqueeze(-1).expand(4, L, P).contiguous(), out=idx)

    wy = torch.empty(B, Q, M, 2, L, P, dtype=dtype, device=dev)  # attn * (1 - fy, fy)
    torch.mul(fy, attn, out=wy[:, :, :, 1])
    torch.sub(attn, wy[:, :, :, 1], out=wy[:, :, :, 0])
    wx = torch.empty(B, Q, M, 2, L, P, dtype=dtype, device=dev)  # (1 - fx, fx)
    wx[:, :, :, 1] = fx
    torch.sub(1, fx, out=wx[:, :, :, 0])
    weights = torch.empty(B, Q, M, 2, 2, L, P, dtype=dtype, device=dev)
    torch.mul(wy.unsqueeze(4), wx.unsqueeze(3), out=weights)
    K = 4 * L * P
    return idx.view(B * Q * M, K), weights.view(B * Q * M, K), frac, top_left


class _GatherMSDeformAttn(torch.autograd.Function):
    """Forward: :func:`_gather_forward` (value table, corners, one ``embedding_bag`` per query chunk);
    only the inputs are kept, the corners are recomputed in the backward (less memory held per layer).

    Backward: the value gradient is the transposed gather. The entries are grouped by their top-left
    table row (a stable sort of one key per sample, not four), each corner's weighted sum of output
    gradients per row is an ``embedding_bag`` over those groups, and the corners' sums are added in at
    their row offsets (+1 pixel in x, +1 row in y: the same for every sample of a level). The
    corner-weight gradient is a dense-dense product sampled at the gathered rows; the location and
    attention-weight gradients follow from the bilinear weights in closed form."""

    @staticmethod
    def forward(ctx, value: Tensor, pixels: Tensor, attn: Tensor, shapes: tuple[tuple[int, int], ...],
                chunk: int) -> Tensor:
        ctx.shapes = shapes
        ctx.save_for_backward(value, pixels, attn)
        return _gather_forward(value, pixels, attn, shapes, chunk)

    @staticmethod
    def backward(ctx, grad: Tensor):
        value, pixels, attn = ctx.saved_tensors
        shapes = ctx.shapes
        B, S, Mv, D = value.shape
        _, Q, M, L, P, _ = pixels.shape
        table, rows, starts = _value_table(value, shapes)
        idx, weights, frac, top_left = _corners(pixels, attn, shapes, rows, starts, Mv)
        n, K = idx.shape
        grad = grad.reshape(n, D).contiguous()
        grad_value = grad_pixels = grad_attn = None
        if ctx.needs_input_grad[0]:
            flat = top_left.reshape(-1)
            order = torch.sort(flat, stable=True)[1]  # samples grouped by top-left row, in bag order
            counts = torch.bincount(flat, minlength=table.shape[0])
            offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            bags = torch.div(order, L * P, rounding_mode="floor")
            # Position of each sorted sample's corner-00 weight in weights (n, 4, L*P); corner c is + c*L*P.
            position = order.add(bags, alpha=3 * L * P)
            grad_table = None
            for c in range(4):
                w = weights.view(-1).index_select(0, position if c == 0 else position + c * L * P)
                g = F.embedding_bag(bags, grad, offsets, mode="sum", include_last_offset=True, per_sample_weights=w)
                if grad_table is None:  # corner 00: no offset
                    grad_table = g.view(B, rows * Mv, D)
                    continue
                g = g.view(B, rows * Mv, D)
                for (h, w_), p0, offs in zip(shapes, starts, _corner_offsets(shapes, Mv)):
                    lo, hi, o = p0 * Mv, (p0 + (h + 3) * (w_ + 3)) * Mv, offs[c]
                    grad_table[:, lo + o : hi] += g[:, lo : hi - o]
            grad_value = torch.cat([grad_table[:, p0 * Mv : (p0 + (h + 3) * (w + 3)) * Mv].view(B, h + 3, w + 3, Mv * D)
                                    [:, 1 : h + 1, 1 : w + 1].reshape(B, h * w, Mv * D)
                                    for (h, w), p0 in zip(shapes, starts)], 1).view(B, S, Mv, D)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # d out / d weights[i, k] = table[idx[i, k]]: a dense-dense product sampled at the index pattern
            # (a CSR matrix whose row i holds the K columns idx[i]).
            crow = torch.arange(0, n * K + 1, K, dtype=idx.dtype, device=idx.device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), weights.reshape(-1), (n, table.shape[0]),
                                                  check_invariants=False)
                gw = torch.sparse.sampled_addmm(pattern, grad, table.t(), beta=0.0).values()
            gw = gw.view(B, Q, M, 2, 2, L, P)
            g00, g01, g10, g11 = gw[:, :, :, 0, 0], gw[:, :, :, 0, 1], gw[:, :, :, 1, 0], gw[:, :, :, 1, 1]
            fx, fy = frac[..., 0], frac[..., 1]
            # weights = attn * wy * wx with wy = (1 - fy, fy), wx = (1 - fx, fx).
            top = torch.lerp(g00, g01, fx)  # sum over x corners of g * wx, top row
            bottom = torch.lerp(g10, g11, fx)
            if ctx.needs_input_grad[2]:
                grad_attn = torch.lerp(top, bottom, fy)
            if ctx.needs_input_grad[1]:
                gx = torch.lerp(g01 - g00, g11 - g10, fy).mul_(attn)
                gy = (bottom - top).mul_(attn)
                hi = pixels.new_tensor([[w + 1, h + 1] for h, w in shapes]).view(L, 1, 2).expand(L, P, 2).contiguous()
                inside = (pixels >= 0) & (pixels <= hi)  # clamp passes the gradient inside its bounds
                grad_pixels = torch.stack([gx, gy], -1).mul_(inside)
        return grad_value, grad_pixels, grad_attn, None, None
