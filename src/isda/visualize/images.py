"""Pictures of images: masks, labels placed clear of each other, ground truth, grids; PNG files.

Pictures are drawn at a display size (see DISPLAY_SHORT_SIDE), never at the model's input size. Files are
written atomically (temp file in the same directory + ``os.replace``).
"""

from __future__ import annotations

import colorsys
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes

from ..fileio import atomic_open
from .labels import Rect, place_labels


# Sampling-point colours per feature level (P3..P6), cycled if there are more levels.
LEVEL_COLORS: tuple[tuple[int, int, int], ...] = ((255, 64, 64), (255, 200, 0), (64, 220, 64), (64, 160, 255))


# Pictures are drawn at a display size, not the model's input size: a 128 px image with 14 px labels
# is unreadable, so every image is upscaled until its short side is at least this many pixels.
DISPLAY_SHORT_SIDE = 384


def _palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-separated saturated colours (golden-ratio hue steps)."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((0.07 + i * 0.618034) % 1.0, 0.85, 0.95)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans (shipped with matplotlib) at ``size`` px: a TrueType font scales, the bitmap default does not."""
    from matplotlib import font_manager

    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except OSError:  # a broken matplotlib install: Pillow's own (scalable since 10.1) font
        try:
            return ImageFont.load_default(size=size)
        except TypeError:
            return ImageFont.load_default()


def label_font_size(height: int, width: int) -> int:
    """Label text height for a picture of this size: about 1/27 of the short side, at least 12 px."""
    return max(12, round(min(height, width) / 27))


def display_scale(height: int, width: int, short_side: int = DISPLAY_SHORT_SIDE) -> float:
    """Factor bringing the short side up to ``short_side`` (1 for images already that large, or short_side=0)."""
    return max(1.0, short_side / min(height, width)) if short_side else 1.0


def _resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[1:]) == size:
        return image
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def _resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(masks.shape[1:]) == size or masks.shape[0] == 0:
        return masks.reshape(masks.shape[0], *size) if masks.shape[0] == 0 else masks
    return F.interpolate(masks[None].float(), size=size, mode="nearest")[0] > 0.5


def _blend_masks(image: torch.Tensor, masks: torch.Tensor, colors: Sequence[tuple[int, int, int]],
                 alpha: float) -> torch.Tensor:
    """Tint each pixel with the colour of the first mask holding it. Not ``draw_segmentation_masks``:
    it paints pixels where masks overlap black, and a crowded image is mostly overlaps."""
    if not len(masks):
        return image
    covered = masks.any(0)
    top = masks.to(torch.uint8).argmax(0)  # index of the first mask at each pixel
    tint = torch.tensor(colors, dtype=torch.float32).T[:, top]  # [3, H, W]
    out = torch.where(covered, image.float() * (1 - alpha) + tint * alpha, image.float())
    return out.round().clamp(0, 255).to(torch.uint8)


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """[N, 4] xyxy boxes (inclusive pixel bounds) of bool [N, H, W] masks; zeros for an empty mask (a
    legitimate, if useless, detection that ``torchvision.ops.masks_to_boxes`` cannot take)."""
    rows, cols = masks.any(2), masks.any(1)
    h, w = masks.shape[1:]

    def first(a: torch.Tensor) -> torch.Tensor:  # index of the first True per row
        return a.float().argmax(1)

    boxes = torch.stack([first(cols), first(rows), w - 1 - first(cols.flip(1)), h - 1 - first(rows.flip(1))], 1)
    return torch.where(masks.flatten(1).any(1)[:, None], boxes.float(), torch.zeros(()))


def _select(items: Any, keep: torch.Tensor, num_preds: int) -> list[Any]:
    """Align per-detection extras with the kept detections.

    Accepts either one entry per prediction (filtered here by ``keep``) or entries already
    restricted to the kept detections (in prediction order).
    """
    items = list(items)
    if len(items) == num_preds:
        return [items[i] for i in keep.tolist()]
    return items


def _check_image(image: torch.Tensor) -> None:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 [3, H, W] image, got {image.dtype} {tuple(image.shape)}")


def _draw_instances(image: torch.Tensor, masks: torch.Tensor, labels: Sequence[int], texts: Sequence[str],
                    num_classes: int, short_side: int,
                    extras: Callable[[ImageDraw.ImageDraw, float], list[Rect]] | None = None,
                    after: Callable[[ImageDraw.ImageDraw, float], None] | None = None) -> torch.Tensor:
    """The shared drawing of predictions and ground truth, at display size: translucent masks with an
    opaque outline (touching instances of one class stay apart), box outlines and a label per instance
    placed by :func:`place_labels`, with a leader line when it had to move away from its box.

    Colours follow the class, so a prediction and its ground truth look alike. ``extras(draw, scale)``
    draws under the labels and returns rectangles the labels must avoid; ``after`` draws over them.
    """
    _, h, w = image.shape
    scale = display_scale(h, w, short_side)
    size = (round(h * scale), round(w * scale))
    out = _resize_image(image.detach().cpu(), size)
    masks = _resize_masks(masks.detach().cpu().bool(), size)
    palette = _palette(max(num_classes, 1))
    colors = [palette[lab % len(palette)] for lab in labels]
    boxes = torch.zeros(0, 4)
    if len(masks):
        boxes = _mask_boxes(masks)
        eroded = -F.max_pool2d(-masks[None].float(), 3, stride=1, padding=1)[0]
        out = _blend_masks(out, masks, colors, alpha=0.45)
        out = _blend_masks(out, masks & (eroded < 0.5), colors, alpha=1.0)
        out = draw_bounding_boxes(out, boxes, colors=colors, width=1)

    pil = Image.fromarray(out.permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(pil)
    avoid = extras(draw, scale) if extras is not None else []
    font = _font(label_font_size(*size))
    pad = max(2, font.size // 6)
    sizes = []
    for text in texts:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        sizes.append((right - left + 2 * pad, bottom - top + 2 * pad))
    placed = [(rect, box, text, c) for rect, box, text, c in
              zip(place_labels(sizes, boxes, masks, avoid), boxes.tolist(), texts, colors) if rect is not None]
    # Leader lines first, so that no line crosses a label drawn before it.
    for (x0, y0, x1, y1), box, _, c in placed:
        # A label that moved away from its box points back to it.
        bx, by = min(max((x0 + x1) / 2, box[0]), box[2]), min(max((y0 + y1) / 2, box[1]), box[3])
        lx, ly = min(max(bx, x0), x1 - 1), min(max(by, y0), y1 - 1)
        if math.hypot(bx - lx, by - ly) > 3:
            draw.line((lx, ly, bx, by), fill=c, width=2)
    for (x0, y0, x1, y1), _, text, c in placed:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=c, outline=(0, 0, 0))
        # Dark text on light tags, white on dark ones (ITU-R BT.601 luma).
        ink = (0, 0, 0) if 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 150 else (255, 255, 255)
        left, top, _, _ = draw.textbbox((0, 0), text, font=font)
        draw.text((x0 + pad - left, y0 + pad - top), text, fill=ink, font=font)
    if after is not None:
        after(draw, scale)
    return torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _class_name(class_names: Sequence[str], label: int) -> str:
    return class_names[label] if 0 <= label < len(class_names) else str(label)


def draw_predictions(
    image: torch.Tensor,
    prediction: Mapping[str, torch.Tensor],
    class_names: Sequence[str],
    score_thr: float = 0.3,
    reference_points: torch.Tensor | None = None,
    sampling_points: Sequence[Mapping[str, torch.Tensor]] | None = None,
    max_sampling_dets: int = 3,
    short_side: int = DISPLAY_SHORT_SIDE,
) -> torch.Tensor:
    """Draw the detections scoring ``>= score_thr``: filled masks, outlines, "name 0.87" labels that
    cover neither each other nor their own mask, at display size (short side ``>= short_side``;
    0 draws at the image's own size).

    ``reference_points``: normalized (x, y) in [0, 1], one per prediction or one per kept detection
    (same order as the prediction); drawn as a filled circle at each kept detection's point.
    ``sampling_points``: per prediction or per kept detection, a dict with ``points`` [N, 2]
    normalized (x, y), ``weights`` [N] and ``levels`` [N]; drawn for the ``max_sampling_dets``
    highest-scoring kept detections only (more is unreadable) as dots coloured by level with
    radius growing with the attention weight. Normalized coordinates refer to ``image`` as given.
    Returns a new uint8 [3, H', W'] tensor; the input is not modified.
    """
    _check_image(image)
    scores = prediction["scores"].detach().cpu().float()
    num_preds = len(scores)
    keep = torch.nonzero(scores >= score_thr).flatten()
    labels = prediction["labels"].detach().cpu()[keep].tolist()
    masks = prediction["masks"].detach().cpu()[keep].bool()
    texts = [f"{_class_name(class_names, lab)} {s:.2f}" for lab, s in zip(labels, scores[keep].tolist())]

    ref = None if reference_points is None else _select(
        reference_points.detach().cpu().float().reshape(-1, 2), keep, num_preds)

    def marker_rects(w: int, h: int) -> list[Rect]:
        """Where the reference-point markers go (labels keep clear of them): centre, radius per point."""
        if ref is None:
            return []
        r = max(3.0, 0.012 * min(h, w))
        return [(round(float(x) * w - r), round(float(y) * h - r), round(float(x) * w + r) + 1,
                 round(float(y) * h + r) + 1) for x, y in ref]

    def points(draw: ImageDraw.ImageDraw, scale: float) -> list[Rect]:
        w, h = draw.im.size
        if not sampling_points:
            return marker_rects(w, h)
        dets = _select(sampling_points, keep, num_preds)
        kept_scores = scores[keep].tolist() if len(dets) == len(keep) else [0.0] * len(dets)
        for i in sorted(range(len(dets)), key=lambda i: -kept_scores[i])[:max_sampling_dets]:
            pts = dets[i]["points"].detach().cpu().float().reshape(-1, 2)
            wts = dets[i]["weights"].detach().cpu().float().reshape(-1)
            lvls = dets[i]["levels"].detach().cpu().long().reshape(-1)
            wmax = float(wts.max()) if wts.numel() and float(wts.max()) > 0 else 1.0
            for (x, y), wt, lv in zip(pts.tolist(), wts.tolist(), lvls.tolist()):
                r = max(1.0, scale / 2) * (1.0 + 3.0 * max(wt, 0.0) / wmax)
                cx, cy = x * w, y * h
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=LEVEL_COLORS[lv % len(LEVEL_COLORS)])
        return marker_rects(w, h)

    def markers(draw: ImageDraw.ImageDraw, scale: float) -> None:
        rects = marker_rects(*draw.im.size)
        palette = _palette(max(len(class_names), 1))
        ref_colors = [palette[lab % len(palette)] for lab in labels] if len(rects) == len(labels) \
            else _palette(len(rects))
        for rect, c in zip(rects, ref_colors):
            # White outline keeps the marker visible on top of a same-coloured mask.
            draw.ellipse((rect[0], rect[1], rect[2] - 1, rect[3] - 1), fill=c, outline=(255, 255, 255), width=2)

    return _draw_instances(image, masks, labels, texts, len(class_names), short_side, points, markers)


def draw_ground_truth(image: torch.Tensor, target: Mapping[str, Any], class_names: Sequence[str],
                      short_side: int = DISPLAY_SHORT_SIDE) -> torch.Tensor:
    """The ground truth (``target["masks"]`` bool [N, H, W], ``target["labels"]`` [N]) drawn like
    :func:`draw_predictions` draws predictions (same class colours, labels without scores)."""
    _check_image(image)
    labels = torch.as_tensor(target["labels"]).tolist()
    masks = torch.as_tensor(target["masks"]).as_subclass(torch.Tensor).bool()
    return _draw_instances(image, masks, labels, [_class_name(class_names, lab) for lab in labels],
                           len(class_names), short_side)


def save_png(image: torch.Tensor, path: str | os.PathLike[str]) -> None:
    """Save a uint8 [3, H, W] tensor as a PNG, atomically."""
    _check_image(image)
    pil = Image.fromarray(image.detach().cpu().permute(1, 2, 0).contiguous().numpy())
    with atomic_open(path, "wb") as f:
        pil.save(f, format="PNG")


def grid(images: Sequence[torch.Tensor], captions: Sequence[str] | None = None, ncols: int | None = None,
         height: int | None = None, padding: int = 8) -> torch.Tensor:
    """uint8 [3, H, W] images as rows of ``ncols`` panels (default: about square) on white, each with
    an optional caption above it.

    Each image is resized (aspect kept) to a common ``height`` (default: the smallest input height) and
    centred in a cell as wide as the widest.
    """
    if not images:
        raise ValueError("grid needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    for im in images:
        _check_image(im)
    target_h = height or min(int(im.shape[1]) for im in images)
    resized = [_resize_image(im.detach().cpu(), (target_h, max(1, round(im.shape[2] * target_h / im.shape[1]))))
               for im in images]
    cell_w = max(int(im.shape[2]) for im in resized)
    ncols = max(1, min(ncols or math.ceil(math.sqrt(len(images))), len(images)))
    nrows = math.ceil(len(images) / ncols)
    font = _font(label_font_size(target_h, cell_w))
    caption_h = round(font.size * 1.6) if captions else 0
    cell_h = caption_h + target_h
    canvas = Image.new("RGB", (padding + ncols * (cell_w + padding), padding + nrows * (cell_h + padding)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(resized):
        x = padding + (i % ncols) * (cell_w + padding) + (cell_w - int(im.shape[2])) // 2
        y = padding + (i // ncols) * (cell_h + padding)
        canvas.paste(Image.fromarray(im.permute(1, 2, 0).contiguous().numpy()), (x, y + caption_h))
        if captions:
            draw.text((x, y + caption_h // 2), captions[i], fill=(0, 0, 0), font=font, anchor="lm")
    return torch.from_numpy(np.array(canvas, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def save_grid(images: Sequence[torch.Tensor], path: str | os.PathLike[str], captions: Sequence[str] | None = None,
              ncols: int | None = None, height: int | None = None, padding: int = 8) -> None:
    """:func:`grid` saved as one PNG."""
    save_png(grid(images, captions, ncols, height, padding), path)


def detection_sampling_points(prediction: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per detection, its sampling points flattened over heads x levels x points, in the form
    ``draw_predictions(sampling_points=...)`` takes (from ``model.record_sampling()`` predictions)."""
    locations, weights = prediction["sampling_locations"], prediction["sampling_weights"]
    heads, levels, points = weights.shape[1:]
    level_of = torch.arange(levels).view(1, levels, 1).expand(heads, levels, points).reshape(-1)
    return [{"points": loc.reshape(-1, 2), "weights": w.reshape(-1), "levels": level_of}
            for loc, w in zip(locations, weights)]
