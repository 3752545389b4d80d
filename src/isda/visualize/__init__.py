"""Visualisation: predictions and ground truth drawn on images at a display size (``images``), labels placed
clear of each other (``labels``), and matplotlib figures of reference points, sampling points and training
curves (``figures``)."""

from .figures import plot_curves, plot_reference_points, plot_sampling_points, read_jsonl, validation_points
from .images import (
    DISPLAY_SHORT_SIDE,
    detection_sampling_points,
    display_scale,
    draw_ground_truth,
    draw_predictions,
    grid,
    label_font_size,
    save_grid,
    save_png,
)
from .labels import place_labels

__all__ = [
    "DISPLAY_SHORT_SIDE",
    "detection_sampling_points",
    "display_scale",
    "draw_ground_truth",
    "draw_predictions",
    "grid",
    "label_font_size",
    "place_labels",
    "plot_curves",
    "plot_reference_points",
    "plot_sampling_points",
    "read_jsonl",
    "save_grid",
    "save_png",
    "validation_points",
]
