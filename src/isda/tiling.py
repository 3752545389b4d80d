"""Large images predicted tile by tile (``isda predict --tile``): overlapping SIZE x SIZE windows, each predicted
on its own, merged into one prediction where every object appears once.

Merge rule (deterministic, no IoU threshold): the window's *core* is the window minus half the overlap on each
side that borders another window, so the cores partition the image; a window's detection is kept only if its
mask's centroid lies in that window's core. An object smaller than half the overlap lies whole in the window
that owns its centroid and, in every other window, either lies whole outside the core or is cut by the window's
edge on the far side of the core's boundary: it is kept exactly once, with its full mask.

Kept instances are stored as their mask's crop (its box) and offset, not as full-image masks: hundreds of
4,000 x 4,000 px bool masks would not fit in memory. Masks are pasted only to draw, and results are written as
RLE directly from the crops.

A model trained on crops (``data.test_window``, set by ``data.fit_sizes``) predicts the same way, window by window at
its test scale (:func:`predict_in_windows`): its coordinates are relative to its input (sine positions, the mask
features' coordinates, the reference points), so an input larger than its training crops means other things to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor

from .engine.evaluation import rle_result
from .models.isda import mask_boxes

MIN_TILE = 32

# Drawing pastes every mask into one [N, H, W] tensor (and the drawing works on float copies of it): past this
# many mask pixels the overlay is drawn at a reduced size.
DRAW_MASK_PIXELS = 2**28

# One window, float [3, h, w] in [0, 1] -> its prediction at the window's size (``scores``, ``labels``, bool
# ``masks`` [K, h, w]), e.g. ``lambda w: isda.inference.predict(model, data_cfg, [w])[0]``.
WindowPredictor = Callable[[Tensor], Mapping[str, Tensor]]


@dataclass(frozen=True)
class Window:
    """A window ``[y0, y1) x [x0, x1)`` and its core ``[cy0, cy1) x [cx0, cx1)`` in image pixels."""

    y0: int
    y1: int
    x0: int
    x1: int
    cy0: int
    cy1: int
    cx0: int
    cx1: int


def check_tile_args(size: int, overlap: int) -> None:
    """Raise ValueError (one line) unless ``size >= MIN_TILE`` and ``0 <= overlap < size``."""
    if size < MIN_TILE:
        raise ValueError(f"--tile must be >= {MIN_TILE} px, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"--tile-overlap must be >= 0 and < --tile ({size}), got {overlap}")


def _spans(length: int, size: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Along one axis: (start, end, core start, core end) per window. Windows step by ``size - overlap``, the
    last one flush with the border (so it may overlap its neighbour by more); cores meet halfway through each
    actual overlap."""
    if length <= size:
        return [(0, length, 0, length)]
    stride = size - overlap
    count = -(-(length - size) // stride) + 1
    starts = [min(i * stride, length - size) for i in range(count)]
    bounds = [0] + [(a + size + b) // 2 for a, b in zip(starts, starts[1:])] + [length]
    return [(s, s + size, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)]


def tile_windows(height: int, width: int, size: int, overlap: int) -> list[Window]:
    """The windows covering an image, row by row; their cores partition it."""
    check_tile_args(size, overlap)
    return [Window(y0, y1, x0, x1, cy0, cy1, cx0, cx1)
            for y0, y1, cy0, cy1 in _spans(height, size, overlap)
            for x0, x1, cx0, cx1 in _spans(width, size, overlap)]


@dataclass
class TiledPrediction:
    """One image's merged detections, by descending score: ``crops[i]`` is instance i's bool mask inside its
    box ``boxes[i]`` (xyxy, inclusive pixel indices in the image, as the model's ``boxes``)."""

    height: int
    width: int
    scores: Tensor
    labels: Tensor
    boxes: Tensor
    crops: list[Tensor]
    num_windows: int

    def __len__(self) -> int:
        return len(self.crops)

    def masks(self, scale: float = 1.0) -> Tensor:
        """The instances pasted into bool [N, H, W] masks (``scale`` < 1: at that fraction of the size, for
        drawing)."""
        h, w = round(self.height * scale), round(self.width * scale)
        out = torch.zeros(len(self), h, w, dtype=torch.bool)
        for i, (crop, (x0, y0, x1, y1)) in enumerate(zip(self.crops, self.boxes.tolist())):
            if scale == 1.0:
                out[i, y0:y1 + 1, x0:x1 + 1] = crop
                continue
            top, left = min(round(y0 * scale), h - 1), min(round(x0 * scale), w - 1)
            size = (max(1, round((y1 + 1) * scale) - top), max(1, round((x1 + 1) * scale) - left))
            out[i, top:top + size[0], left:left + size[1]] = F.interpolate(
                crop[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5
        return out

    def prediction(self, size: tuple[int, int], limit: int) -> dict[str, Tensor]:
        """The ``limit`` best instances as a model's per-image dict: ``scores``, ``labels``, bool ``masks`` resized
        from this image's size to ``size`` (H, W) and their ``boxes``."""
        top = dataclasses.replace(self, scores=self.scores[:limit], labels=self.labels[:limit],
                                  boxes=self.boxes[:limit], crops=self.crops[:limit])
        masks = top.masks()
        if tuple(size) != (self.height, self.width):
            masks = F.interpolate(masks[None].float(), size=tuple(size), mode="bilinear", antialias=True,
                                  align_corners=False)[0] > 0.5
        return {"scores": top.scores, "labels": top.labels, "masks": masks, "boxes": mask_boxes(masks)}

    def coco_results(self, image_id: int, cat_ids: Sequence[int]) -> list[dict[str, Any]]:
        """COCO results entries (RLE encoded from the crops, no full-size mask made)."""
        return [rle_result(image_id, cat_ids[label], self._rle(crop, box), score)
                for crop, box, label, score in zip(self.crops, self.boxes.tolist(), self.labels.tolist(),
                                                   self.scores.tolist())]

    def _rle(self, crop: Tensor, box: list[int]) -> dict[str, Any]:
        """pycocotools RLE of a crop at its place: runs of the column-major indices of its pixels."""
        cols, rows = np.nonzero(crop.numpy().T)  # column-major order, as COCO's RLE
        index = (cols + box[0]) * self.height + rows + box[1]
        breaks = np.flatnonzero(np.diff(index) != 1)
        starts = index[np.r_[0, breaks + 1]]
        ends = index[np.r_[breaks, len(index) - 1]] + 1
        counts = np.empty(2 * len(starts) + 1, dtype=np.int64)
        counts[0::2] = np.r_[starts[0], starts[1:] - ends[:-1], self.height * self.width - ends[-1]]
        counts[1::2] = ends - starts
        return mask_utils.frPyObjects({"counts": counts.tolist(), "size": [self.height, self.width]},
                                      self.height, self.width)


def predict_tiled(predict_window: WindowPredictor, image: Tensor, size: int, overlap: int,
                  score_thr: float) -> TiledPrediction:
    """``image`` float [3, H, W] in [0, 1] predicted window by window (see the module doc for the merge rule).
    Keeps the detections scoring ``>= score_thr``; empty masks are dropped (no window owns them)."""
    _, height, width = image.shape
    windows = tile_windows(height, width, size, overlap)
    scores, labels, boxes, crops = [], [], [], []
    for win in windows:
        pred = predict_window(image[:, win.y0:win.y1, win.x0:win.x1])
        keep = pred["scores"].detach().cpu() >= score_thr
        masks = pred["masks"].detach().cpu()[keep].bool()
        area = masks.sum((1, 2))
        rows, cols = masks.sum(2).float(), masks.sum(1).float()  # [K, h], [K, w] pixel counts
        # Centroid (pixel centres at +0.5) in image pixels; floor gives the pixel that holds it.
        cy = (rows @ (torch.arange(rows.shape[1]) + 0.5) / area.clamp(min=1)).floor().long() + win.y0
        cx = (cols @ (torch.arange(cols.shape[1]) + 0.5) / area.clamp(min=1)).floor().long() + win.x0
        owned = (area > 0) & (cy >= win.cy0) & (cy < win.cy1) & (cx >= win.cx0) & (cx < win.cx1)
        for i in torch.nonzero(owned).flatten().tolist():
            ys, xs = torch.nonzero(rows[i]).flatten(), torch.nonzero(cols[i]).flatten()
            y0, y1, x0, x1 = int(ys[0]), int(ys[-1]), int(xs[0]), int(xs[-1])
            crops.append(masks[i, y0:y1 + 1, x0:x1 + 1].clone())  # a copy: the window's masks are freed
            boxes.append([x0 + win.x0, y0 + win.y0, x1 + win.x0, y1 + win.y0])
        scores.append(pred["scores"].detach().cpu()[keep][owned].float())
        labels.append(pred["labels"].detach().cpu()[keep][owned].long())
    scores_all, labels_all = torch.cat(scores), torch.cat(labels)
    order = torch.sort(scores_all, descending=True, stable=True).indices
    return TiledPrediction(height, width, scores_all[order], labels_all[order],
                           torch.tensor(boxes, dtype=torch.long).reshape(-1, 4)[order],
                           [crops[i] for i in order.tolist()], len(windows))


def predict_in_windows(model: Callable[..., list[dict[str, Tensor]]], images: Sequence[Tensor],
                       output_sizes: Sequence[tuple[int, int]], window: int) -> list[dict[str, Tensor]]:
    """``model(images, output_sizes=...)`` for images already at the test scale, each one larger than ``window`` px
    predicted window by window (``window`` x ``window``, overlapping by half a window, merged by the core rule) as
    the model saw its training crops. Per image: ``scores``, ``labels``, bool ``masks`` at its output size and
    ``boxes``, as many detections as one window gives at most (the model's own budget)."""
    out = []
    for image, size in zip(images, output_sizes):
        if image.shape[1] <= window and image.shape[2] <= window:
            out += model([image], output_sizes=[size])
            continue
        counts = []

        def one_window(crop: Tensor) -> dict[str, Tensor]:
            (pred,) = model([crop])
            counts.append(len(pred["scores"]))
            return pred

        tiled = predict_tiled(one_window, image, window, window // 2, score_thr=0.0)
        out.append(tiled.prediction(size, max(counts)))
    return out


def draw_tiled(image: Tensor, tiled: TiledPrediction, class_names: Sequence[str], score_thr: float) -> Tensor:
    """The overlay of a tiled prediction (uint8 [3, H, W] image), as :func:`isda.visualize.draw_predictions`
    draws one; at a reduced size when the pasted masks would exceed ``DRAW_MASK_PIXELS``."""
    from .visualize import draw_predictions

    scale = min(1.0, (DRAW_MASK_PIXELS / max(1, len(tiled) * tiled.height * tiled.width)) ** 0.5)
    if scale < 1.0:
        size = (round(tiled.height * scale), round(tiled.width * scale))
        image = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True,
                              align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
    pred = {"scores": tiled.scores, "labels": tiled.labels, "masks": tiled.masks(scale)}
    return draw_predictions(image, pred, class_names, score_thr=score_thr)
