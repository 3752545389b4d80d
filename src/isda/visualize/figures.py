"""Figures drawn with matplotlib: reference points, per-level sampling points, training curves.

Everything renders off-screen (matplotlib Agg through ``Figure`` objects, never pyplot's global state) so it
is safe in training loops, worker processes and headless machines.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..fileio import atomic_open
from .images import _check_image, _class_name, _palette

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


def _distinct_detections(masks: torch.Tensor, scores: torch.Tensor, score_thr: float, count: int) -> list[int]:
    """Up to ``count`` detections ``>= score_thr`` (the best one if none is), best first, skipping any whose
    mask overlaps a chosen one by IoU > 0.5: duplicates would hide each other's sampling points."""
    chosen: list[int] = []
    for i in torch.nonzero(scores >= score_thr).flatten().tolist():
        inter = (masks[chosen] & masks[i]).flatten(1).sum(1).float()
        union = (masks[chosen] | masks[i]).flatten(1).sum(1).float().clamp(min=1)
        if not (inter / union > 0.5).any():
            chosen.append(i)
        if len(chosen) == count:
            break
    return chosen or [int(scores.argmax())]


def plot_sampling_points(
    image: torch.Tensor,
    prediction: Mapping[str, torch.Tensor],
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    score_thr: float = 0.3,
    max_dets: int = 3,
) -> None:
    """Where the last decoder layer's deformable attention sampled, one panel per feature level (P3, P4,
    ...): for each of the ``max_dets`` best distinct detections (those ``>= score_thr``; the best one if none
    is), its mask outline, its reference point (star) and its sampling points over all heads, dot area
    proportional to the attention weight. A legend names the detections and gives the dot sizes of three
    weights; each panel's title gives the share of the shown detections' attention spent on that level.

    ``prediction`` comes from a model after ``record_sampling()``: ``sampling_locations`` [K, heads,
    levels, points, 2] normalized (x, y), ``sampling_weights`` [K, heads, levels, points], plus
    ``scores``, ``labels``, ``masks`` and ``reference_points``.
    """
    _check_image(image)
    scores = prediction["scores"].detach().cpu().float()
    if len(scores) == 0:
        raise ValueError("no detections to draw sampling points for")
    dets = _distinct_detections(prediction["masks"].detach().cpu().bool(), scores, score_thr, max_dets)
    locations = prediction["sampling_locations"].detach().cpu().float()[dets]  # [D, heads, L, P, 2]
    weights = prediction["sampling_weights"].detach().cpu().float()[dets]  # [D, heads, L, P]
    labels = prediction["labels"].detach().cpu()[dets].tolist()
    masks = prediction["masks"].detach().cpu()[dets].bool().numpy()
    refs = prediction["reference_points"].detach().cpu().float()[dets] if "reference_points" in prediction else None
    h, w = image.shape[1:]
    levels = weights.shape[2]
    wmax = max(float(weights.max()), 1e-6)

    def area(wt: np.ndarray | float) -> np.ndarray | float:  # marker area in points^2
        return 12.0 + 330.0 * np.asarray(wt) / wmax

    colors = [np.array(c) / 255 for c in _palette(len(dets))]
    ncols = 2 if levels > 1 else 1
    nrows = math.ceil(levels / ncols)
    fig = Figure(figsize=(5.6 * ncols, 5.6 * nrows * h / w + 1.4), layout="constrained")
    # Dim the photo so the coloured dots stand out on any background.
    background = (0.45 * image.detach().cpu().permute(1, 2, 0).numpy() / 255 + 0.55).clip(0, 1)
    total = weights.sum()
    for lv in range(levels):
        ax = fig.add_subplot(nrows, ncols, lv + 1)
        ax.imshow(background, extent=(0, w, h, 0), interpolation="bilinear")
        for d, c in enumerate(colors):
            if masks[d].any():
                # Pixel centres as coordinates: the axes already point y down, as the image does.
                ax.contour(np.arange(w) + 0.5, np.arange(h) + 0.5, masks[d].astype(np.float32), levels=[0.5],
                           colors=[c], linewidths=1.5)
            pts = locations[d, :, lv].reshape(-1, 2).numpy()
            wts = weights[d, :, lv].reshape(-1).numpy()
            order = np.argsort(-wts)  # small dots on top of large ones
            ax.scatter(pts[order, 0] * w, pts[order, 1] * h, s=area(wts[order]), color=c, alpha=0.8,
                       edgecolors="black", linewidths=0.6)
            if refs is not None:
                ax.scatter([float(refs[d, 0]) * w], [float(refs[d, 1]) * h], marker="*", s=260, color=c,
                           edgecolors="white", linewidths=1.2, zorder=5)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        share = float(weights[:, :, lv].sum() / total) if float(total) > 0 else 0.0
        ax.set_title(f"level {lv} (P{lv + 3}, stride {2 ** (lv + 3)}): {share:.0%} of the weight", fontsize=12)
    handles = [Line2D([], [], linestyle="none", marker="o", markersize=10, color=c, markeredgecolor="black",
                      label=f"{_class_name(class_names, lab)} {scores[i]:.2f}")
               for c, lab, i in zip(colors, labels, dets)]
    if refs is not None:
        handles.append(Line2D([], [], linestyle="none", marker="*", markersize=14, color="grey",
                              markeredgecolor="white", label="reference point"))
    for frac in (0.25, 0.5, 1.0):
        wt = float(f"{frac * wmax:.2g}")
        handles.append(Line2D([], [], linestyle="none", marker="o", color="lightgrey", markeredgecolor="black",
                              markersize=math.sqrt(float(area(wt))), label=f"weight {wt:g}"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=11, frameon=False)
    fig.suptitle("Deformable attention sampling points of the last decoder layer (all heads)", fontsize=13)
    _save_figure(fig, path)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
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
    rows = read_jsonl(metrics_jsonl_path)
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
