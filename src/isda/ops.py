"""Multi-scale deformable attention core (pure PyTorch: CPU, CUDA and MPS, no compiled extension).

Two implementations of the same function, chosen by device (``impl="auto"``):

* ``"gather"`` (CPU default): every bilinear sample is 4 weighted rows of a channels-last value table,
  so the whole op is one weighted gather-sum, ``F.embedding_bag(mode="sum")`` over bags of
  ``4 * levels * points`` rows per (batch, query, head). Each row is ``head_dim`` contiguous floats
  (grid_sample reads each channel from a different plane), the weighted sum over levels, points and
  corners happens inside the kernel (no ``sampled * weights`` temporaries) and the output comes out in
  the ``(B, Q, heads * head_dim)`` layout directly. Each level is stored with a zero border (1 pixel
  before, 2 after), so clamping the continuous coordinate replaces the per-corner bounds checks.
  The backward is hand-written (:class:`_WeightedGatherSum`): value gradient as the transposed gather
  (a stable sort of the rows, then ``embedding_bag`` again), weight gradient as a sampled
  dense-dense product.
* ``"grid_sample"`` (other devices): ``F.grid_sample`` per level with the heads folded into the batch.

Both agree with a dense float64 reference to ~1e-12 (tests/test_ops.py, tests/test_benchmarks.py).
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


# ---- grid_sample implementation ------------------------------------------------------------------

def _grid_sample_ms_deform_attn(value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor,
                                attention_weights: Tensor) -> Tensor:
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    # grid_sample wants (N, C, H, W) maps and (N, Q, P, 2) grids in [-1, 1]; fold heads into N.
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)  # (B*M, Q, L, P, 2)
    weights = attention_weights.transpose(1, 2).flatten(0, 1).unsqueeze(1)  # (B*M, 1, Q, L, P)
    values = value.flatten(2).transpose(1, 2).reshape(B * M, D, S)  # (B*M, D, S)
    out = value.new_zeros(B * M, D, Q)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        v = values[:, :, start : start + h * w].reshape(B * M, D, h, w)
        start += h * w
        sampled = F.grid_sample(v, grids[:, :, lvl], mode="bilinear", padding_mode="zeros", align_corners=False)
        # Accumulate per level instead of stacking levels: peak memory of one level's samples.
        out = out + (sampled * weights[:, :, :, lvl]).sum(-1)
    return out.view(B, M * D, Q).transpose(1, 2).contiguous()


# ---- gather (embedding_bag) implementation ---------------------------------------------------------

def _gather_ms_deform_attn(value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor,
                           attention_weights: Tensor) -> Tensor:
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    dev, dtype = value.device, value.dtype
    # Channels-last value table, each level with a zero border (1 before, 2 after in x and y): clamping a
    # coordinate to [0, size + 1] in padded pixels then gives exactly the zeros outside the map, and both
    # corners of a clamped coordinate stay inside the level.
    tables, starts, start, pos = [], [], 0, 0
    for h, w in shapes:
        level = value[:, start : start + h * w].reshape(B, h, w, M * D)
        tables.append(F.pad(level, (0, 0, 1, 2, 1, 2)).reshape(B, (h + 3) * (w + 3), M * D))
        starts.append(pos)
        start, pos = start + h * w, pos + (h + 3) * (w + 3)
    table = torch.cat(tables, 1).view(B * pos * M, D)  # row (b * Sp + token) * M + head
    itype = torch.int32 if B * pos * M < 2**31 - 1 else torch.int64

    # Continuous padded-pixel coordinates (pixel centres at integers; the image's [0, 1] maps to [1, size+1]).
    size = torch.tensor([[w, h] for h, w in shapes], dtype=dtype, device=dev).view(L, 1, 2)
    xy = torch.addcmul(torch.full((), 0.5, dtype=dtype, device=dev), sampling_locations.to(dtype), size)
    xy = torch.clamp(xy, torch.zeros_like(size), size + 1)
    xy0 = xy.floor()
    frac = xy - xy0  # (B, Q, M, L, P, 2): weight of the +1 corner along x and y
    ixy = xy0.to(itype)

    # Table row of each sample's top-left corner; the other corners are +M (x + 1), +row (y + 1).
    row = torch.tensor([(w + 3) * M for _, w in shapes], dtype=itype, device=dev).view(L, 1)
    base = ((torch.arange(B, dtype=itype, device=dev).view(B, 1, 1, 1, 1) * pos
             + torch.tensor(starts, dtype=itype, device=dev).view(1, 1, 1, L, 1)) * M
            + torch.arange(M, dtype=itype, device=dev).view(1, 1, M, 1, 1))  # (B, 1, M, L, 1)
    top_left = torch.addcmul(base, ixy[..., 1], row).add_(ixy[..., 0], alpha=M)  # (B, Q, M, L, P)
    corner = torch.stack([torch.zeros_like(row), torch.full_like(row, M), row, row + M])  # (4, L, 1)
    idx = top_left.unsqueeze(3) + corner  # (B, Q, M, 4, L, P), corners (y, x): 00, 01, 10, 11

    wy = torch.stack([1 - frac[..., 1], frac[..., 1]], 3) * attention_weights.to(dtype).unsqueeze(3)
    wx = torch.stack([1 - frac[..., 0], frac[..., 0]], 3)  # (B, Q, M, 2, L, P)
    weights = wy.unsqueeze(4) * wx.unsqueeze(3)  # (B, Q, M, 2, 2, L, P)
    K = 4 * L * P
    out = _WeightedGatherSum.apply(table, idx.view(B * Q * M, K), weights.view(B * Q * M, K))
    return out.view(B, Q, M * D)


class _WeightedGatherSum(torch.autograd.Function):
    """out[i] = sum_k weights[i, k] * table[index[i, k]] (embedding_bag "sum" with per-sample weights),
    with a backward that is much faster on CPU than embedding_bag's own (no per-row scatter)."""

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(table, index, weights)
        return F.embedding_bag(index, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        table, index, weights = ctx.saved_tensors
        n, K = index.shape
        grad = grad.contiguous()
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            # Transposed gather: group the (bag, k) entries by table row (stable sort keeps each row's
            # entries in bag order), then each row's gradient is a weighted sum of its bags' gradients.
            flat = index.reshape(-1)
            order = torch.sort(flat, stable=True)[1]
            counts = torch.bincount(flat, minlength=table.shape[0])
            offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            bags = torch.div(order, K, rounding_mode="floor")
            grad_table = F.embedding_bag(bags, grad, offsets, mode="sum", include_last_offset=True,
                                         per_sample_weights=weights.reshape(-1).index_select(0, order))
        if ctx.needs_input_grad[2]:
            # d out[i] / d weights[i, k] = table[index[i, k]]: a dense-dense product sampled at the index
            # pattern (a CSR matrix whose row i holds the K columns index[i]).
            crow = torch.arange(0, n * K + 1, K, dtype=index.dtype, device=index.device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                pattern = torch.sparse_csr_tensor(crow, index.reshape(-1), weights.reshape(-1), (n, table.shape[0]),
                                                  check_invariants=False)
                grad_weights = torch.sparse.sampled_addmm(pattern, grad, table.t(), beta=0.0).values().view(n, K)
        return grad_table, None, grad_weights
