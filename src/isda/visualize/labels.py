"""Label placement: each label at the free spot nearest its instance, clear of the other labels and of its own
mask (a greedy placer over summed-area tables)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Rect = tuple[int, int, int, int]  # x0, y0, x1, y1 (end exclusive)


def _integral(a: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row and column: any rectangle's sum in four lookups."""
    out = np.zeros((a.shape[0] + 1, a.shape[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(a, axis=0, dtype=np.int64), axis=1, out=out[1:, 1:])
    return out


def _window_sums(table: np.ndarray, h: int, w: int) -> np.ndarray:
    """Sum over every h x w window (index = window's top-left corner) from a summed-area table."""
    return table[h:, w:] - table[:-h, w:] - table[h:, :-w] + table[:-h, :-w]


def place_labels(sizes: Sequence[tuple[int, int]], boxes: torch.Tensor, masks: torch.Tensor,
                 obstacles: Sequence[Rect] = (), margin: int = 1) -> list[Rect | None]:
    """Greedy label placement: each label (in the order given: most confident first) takes, among all
    positions inside the image, the free one nearest to just above its box's top-left corner.

    ``sizes``: (width, height) of each label; ``boxes``: [N, 4] xyxy; ``masks``: bool [N, H, W] (the
    image size). Free means: no overlap with a label placed before (or an ``obstacles`` rectangle) and
    no pixel of the label's own mask under it. A position over other instances' masks costs as much as
    moving two label heights away. Where nothing is free, the label accepts its own mask; where even that
    fails (more labels than room) it is left out: None, as a label under another one cannot be read.
    Returns one (x0, y0, x1, y1) or None per label.
    """
    masks = masks.detach().cpu().bool()
    H, W = masks.shape[1:]
    occupied = np.zeros((H, W), dtype=np.int32)
    for x0, y0, x1, y1 in obstacles:
        occupied[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = 1
    all_masks = _integral(masks.sum(0).numpy()) if len(masks) else np.zeros((H + 1, W + 1), np.int64)
    rects: list[Rect | None] = []
    for (tw, th), box, mask in zip(sizes, boxes.tolist(), masks):
        tw, th = min(int(tw), W), min(int(th), H)
        occ = _window_sums(_integral(occupied), th, tw)
        own = _window_sums(_integral(mask.numpy()), th, tw)
        others = _window_sums(all_masks, th, tw) - own
        ys = np.arange(H - th + 1, dtype=np.float64)[:, None]
        xs = np.arange(W - tw + 1, dtype=np.float64)[None, :]
        cost = np.hypot(xs - box[0], ys - (box[1] - th - 1)) + 2.0 * th * others / (tw * th)
        free = occ == 0
        clean = free & (own == 0)
        if clean.any():
            cost = np.where(clean, cost, np.inf)
        elif free.any():
            cost = np.where(free, cost + 4.0 * own, np.inf)
        else:
            rects.append(None)
            continue
        y, x = np.unravel_index(int(np.argmin(cost)), cost.shape)
        rects.append((int(x), int(y), int(x) + tw, int(y) + th))
        occupied[max(0, y - margin):y + th + margin, max(0, x - margin):x + tw + margin] = 1
    return rects
