"""Visualisation: predictions drawn on images, reference/sampling points, training curves.

Everything renders off-screen (matplotlib Agg through ``Figure`` objects, never pyplot's global
state) so it is safe in training loops, worker processes and headless machines. Files are written
atomically (temp file in the same directory + ``os.replace``).
"""

from __future__ import annotations

import colorsys
import contextlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

from .fileio import atomic_open

__all__ = [
    "draw_predictions",
    "plot_curves",
    "plot_reference_points",
    "save_grid",
    "save_png",
    "validation_points",
]

# Sampling-point colours per feature level (P3..P6), cycled if there are more levels.
LEVEL_COLORS: tuple[tuple[int, int, int], ...] = ((255, 64, 64), (255, 200, 0), (64, 220, 64), (64, 160, 255))


def _palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-separated saturated colours (golden-ratio hue steps)."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((0.07 + i * 0.618034) % 1.0, 0.85, 0.95)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed-size bitmap font
        return ImageFont.load_default()


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


def draw_predictions(
    image: torch.Tensor,
    prediction: Mapping[str, torch.Tensor],
    class_names: Sequence[str],
    score_thr: float = 0.3,
    reference_points: torch.Tensor | None = None,
    sampling_points: Sequence[Mapping[str, torch.Tensor]] | None = None,
    max_sampling_dets: int = 3,
) -> torch.Tensor:
    """Draw the detections scoring ``>= score_thr``: filled masks, box outlines, "name 0.87" labels.

    ``reference_points``: normalized (x, y) in [0, 1], one per prediction or one per kept detection
    (same order as the prediction); drawn as a filled circle at each kept detection's point.
    ``sampling_points``: per prediction or per kept detection, a dict with ``points`` [N, 2]
    normalized (x, y), ``weights`` [N] and ``levels`` [N]; drawn for the ``max_sampling_dets``
    highest-scoring kept detections only (more is unreadable) as dots coloured by level with
    radius growing with the attention weight. Normalized coordinates refer to ``image`` as given.
    Returns a new uint8 [3, H, W] tensor; the input is not modified.
    """
    _check_image(image)
    image = image.detach().cpu()
    _, h, w = image.shape
    scores = prediction["scores"].detach().cpu().float()
    keep = torch.nonzero(scores >= score_thr).flatten()
    out = image.clone()
    if keep.numel() == 0 and reference_points is None and not sampling_points:
        return out

    colors = _palette(len(keep))
    texts: list[str] = []
    boxes = torch.zeros(0, 4)
    if keep.numel():
        masks = prediction["masks"].detach().cpu()[keep].bool()
        out = draw_segmentation_masks(out, masks, alpha=0.5, colors=colors)
        boxes = prediction["boxes"].detach().cpu()[keep].float()
        out = draw_bounding_boxes(out, boxes, colors=colors, width=2)
        labels = prediction["labels"].detach().cpu()[keep].tolist()
        texts = [f"{class_names[lab] if 0 <= lab < len(class_names) else lab} {s:.2f}"
                 for lab, s in zip(labels, scores[keep].tolist())]

    # Labels and points are drawn with PIL: white text on a filled tag stays readable on any
    # mask colour, and torchvision has no filled-dot primitive with per-dot radius.
    pil = Image.fromarray(out.permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(pil)
    num_preds = len(scores)

    if sampling_points:
        dets = _select(sampling_points, keep, num_preds)
        kept_scores = scores[keep].tolist() if len(dets) == len(keep) else [0.0] * len(dets)
        top_dets = sorted(range(len(dets)), key=lambda i: -kept_scores[i])[:max_sampling_dets]
        for i in top_dets:
            pts = dets[i]["points"].detach().cpu().float().reshape(-1, 2)
            wts = dets[i]["weights"].detach().cpu().float().reshape(-1)
            lvls = dets[i]["levels"].detach().cpu().long().reshape(-1)
            wmax = float(wts.max()) if wts.numel() and float(wts.max()) > 0 else 1.0
            for (x, y), wt, lv in zip(pts.tolist(), wts.tolist(), lvls.tolist()):
                r = 1.0 + 4.0 * max(wt, 0.0) / wmax
                cx, cy = x * w, y * h
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=LEVEL_COLORS[lv % len(LEVEL_COLORS)])

    font = _font(max(10, round(0.02 * h)))
    for (x0, y0, _, _), text, c in zip(boxes.tolist(), texts, colors):
        # Inside the box's top-left corner (2 px box outline + 1 px margin), as torchvision does.
        left, top, right, bottom = draw.textbbox((x0 + 3, y0 + 3), text, font=font)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=c)
        draw.text((x0 + 3, y0 + 3), text, fill=(255, 255, 255), font=font)

    if reference_points is not None:
        ref = _select(reference_points.detach().cpu().float().reshape(-1, 2), keep, num_preds)
        ref_colors = colors if len(ref) == len(colors) else _palette(len(ref))
        r = max(3.0, 0.01 * min(h, w))
        for (x, y), c in zip(ref, ref_colors):
            cx, cy = float(x) * w, float(y) * h
            # White outline keeps the marker visible on top of a same-coloured mask.
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=c, outline=(255, 255, 255), width=1)

    return torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def save_png(image: torch.Tensor, path: str | os.PathLike[str]) -> None:
    """Save a uint8 [3, H, W] tensor as a PNG, atomically."""
    _check_image(image)
    pil = Image.fromarray(image.detach().cpu().permute(1, 2, 0).contiguous().numpy())
    with atomic_open(path, "wb") as f:
        pil.save(f, format="PNG")


def _save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 100) -> None:
    FigureCanvasAgg(fig)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)


def plot_reference_points(
    points: torch.Tensor,
    scores: torch.Tensor,
    path: str | os.PathLike[str],
    image: torch.Tensor | None = None,
) -> None:
    """Scatter every query's normalized reference point coloured by its score (with colorbar).

    With ``image`` (uint8 [3, H, W]) the points are drawn over it in pixel coordinates; otherwise
    on the unit square with y pointing down, as in image coordinates.
    """
    pts = points.detach().cpu().float().reshape(-1, 2).numpy()
    sc = scores.detach().cpu().float().reshape(-1).numpy()
    if len(pts) != len(sc):
        raise ValueError(f"{len(pts)} points but {len(sc)} scores")
    fig = Figure(figsize=(6.4, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    if image is not None:
        _check_image(image)
        h, w = image.shape[1:]
        ax.imshow(image.detach().cpu().permute(1, 2, 0).numpy())
        xs, ys = pts[:, 0] * w, pts[:, 1] * h
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
    else:
        xs, ys = pts[:, 0], pts[:, 1]
        ax.set_xlim(0, 1)
        ax.set_ylim(1, 0)
        ax.set_aspect("equal")
    # Draw high scores last so they stay visible where points overlap.
    order = np.argsort(sc, kind="stable")
    sca = ax.scatter(xs[order], ys[order], c=sc[order], cmap="viridis", s=14,
                     edgecolors="black", linewidths=0.3)
    fig.colorbar(sca, ax=ax, label="score", shrink=0.8)
    ax.set_title(f"Reference points ({len(pts)} queries)")
    fig.tight_layout()
    _save_figure(fig, path)


def _read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            # A run killed mid-write may leave a truncated last line: skip it rather than fail.
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if isinstance(row, dict):
                    rows.append(row)
    return rows


def _smooth(values: np.ndarray) -> np.ndarray:
    """Bias-corrected exponential moving average, span ~2% of the series (min 1)."""
    if len(values) < 3:
        return values
    beta = 1.0 - 1.0 / max(1.0, len(values) / 50.0)
    out = np.empty_like(values)
    avg = 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1.0 - beta) * v
        out[i] = avg / (1.0 - beta ** (i + 1)) if beta > 0 else v
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_curves(metrics_jsonl_path: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Two-panel PNG: training loss vs iteration (raw + smoothed) and mask AP (x100) at each validation.

    Reads JSON lines with ``{"type": "train", "epoch", "iter", "loss", ...}`` and
    ``{"type": "val", "epoch", "iter", "AP", "AP50", ...}`` (AP on the 0-1 scale). If ``iter``
    restarts every epoch, rows are plotted by their order instead. Missing rows leave a note in
    the panel instead of failing.
    """
    rows = _read_jsonl(metrics_jsonl_path)
    train = [r for r in rows if r.get("type") == "train" and _finite(r.get("loss"))]
    val = [r for r in rows if r.get("type") == "val" and _finite(r.get("AP")) and _finite(r.get("epoch"))]

    fig = Figure(figsize=(11.0, 4.0))
    ax_loss, ax_ap = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)

    if train:
        loss = np.array([r["loss"] for r in train], dtype=np.float64)
        iters = [r.get("iter") for r in train]
        monotonic = all(_finite(i) for i in iters) and all(a <= b for a, b in zip(iters, iters[1:]))
        x = np.array(iters, dtype=np.float64) if monotonic else np.arange(len(train), dtype=np.float64)
        ax_loss.plot(x, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss")
        ax_loss.plot(x, _smooth(loss), color="tab:blue", linewidth=1.8, label="smoothed")
        ax_loss.legend(loc="upper right")
        ax_loss.set_xlabel("iteration" if monotonic else "logged step")
    else:
        ax_loss.text(0.5, 0.5, "no training rows", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_title("Training loss")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)

    if val:
        points = validation_points(val)
        for key, style in (("AP", "o-"), ("AP50", "s--"), ("AP75", "^--")):
            pts = [(x, 100.0 * r[key]) for x, r in points if _finite(r.get(key))]
            if pts:
                ax_ap.plot(*zip(*pts), style, label=f"mask {key}", markersize=4)
        ax_ap.legend(loc="lower right")
    else:
        ax_ap.text(0.5, 0.5, "no validation rows yet", ha="center", va="center", transform=ax_ap.transAxes)
    ax_ap.set_title("Validation mask AP")
    ax_ap.set_xlabel("iteration" if _validation_x(val) == "iter" else "epoch")
    ax_ap.set_ylabel("AP (x100)")
    ax_ap.grid(alpha=0.3)

    fig.tight_layout()
    _save_figure(fig, path)


def _validation_x(val: list[dict]) -> str:
    return "iter" if all(_finite(r.get("iter")) for r in val) else "epoch"


def validation_points(val: list[dict]) -> list[tuple[float, dict]]:
    """(x, row) per validation, sorted: x is the iteration when every row has one (a time-budgeted run also
    validates mid-epoch), else the epoch. The last row wins when a point was evaluated twice (a resumed run)."""
    key = _validation_x(val)
    latest = {r[key]: r for r in val}
    return sorted(latest.items(), key=lambda item: item[0])


def save_grid(images: Sequence[torch.Tensor], path: str | os.PathLike[str], height: int | None = None,
              padding: int = 4) -> None:
    """Save uint8 [3, H, W] images side by side as one PNG.

    Each is resized (aspect kept) to a common ``height`` (default: the smallest input height, so
    nothing is upscaled) and padded on the right to the widest, as ``make_grid`` needs equal sizes.
    """
    if not images:
        raise ValueError("save_grid needs at least one image")
    for im in images:
        _check_image(im)
    target_h = height or min(int(im.shape[1]) for im in images)
    resized = []
    for im in images:
        im = im.detach().cpu()
        h, w = im.shape[1:]
        new_w = max(1, round(w * target_h / h))
        if (h, w) != (target_h, new_w):
            im = F.interpolate(im[None].float(), size=(target_h, new_w), mode="bilinear",
                               align_corners=False, antialias=True)[0].round().clamp(0, 255).to(torch.uint8)
        resized.append(im)
    max_w = max(int(im.shape[2]) for im in resized)
    padded = [F.pad(im, (0, max_w - im.shape[2]), value=255) for im in resized]
    grid = make_grid(padded, nrow=len(padded), padding=padding, pad_value=255)
    save_png(grid, path)


def detection_sampling_points(prediction: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per detection, its sampling points flattened over heads x levels x points, in the form
    ``draw_predictions(sampling_points=...)`` takes (from ``model.record_sampling()`` predictions)."""
    locations, weights = prediction["sampling_locations"], prediction["sampling_weights"]
    heads, levels, points = weights.shape[1:]
    level_of = torch.arange(levels).view(1, levels, 1).expand(heads, levels, points).reshape(-1)
    return [{"points": loc.reshape(-1, 2), "weights": w.reshape(-1), "levels": level_of}
            for loc, w in zip(locations, weights)]
