"""Visualisation: drawn pixels land where they should, files are valid PNGs of the right size."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from isda.visualize import (draw_predictions, plot_curves, plot_reference_points, save_grid, save_png,
                            validation_points)

H, W = 100, 160
NAMES = ["person", "car"]


def _image() -> torch.Tensor:
    return torch.full((3, H, W), 128, dtype=torch.uint8)


def _prediction() -> dict[str, torch.Tensor]:
    """A confident detection top-left and a low-score one bottom-right."""
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[0, 10:40, 20:60] = True
    masks[1, 60:90, 100:150] = True
    return {
        "scores": torch.tensor([0.87, 0.1]),
        "labels": torch.tensor([0, 1]),
        "masks": masks,
        "boxes": torch.tensor([[20.0, 10.0, 59.0, 39.0], [100.0, 60.0, 149.0, 89.0]]),
    }


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a != b).any(dim=0)


def test_draw_changes_exactly_the_kept_masks() -> None:
    image, pred = _image(), _prediction()
    out = draw_predictions(image, pred, NAMES, score_thr=0.3)
    assert out.dtype == torch.uint8 and out.shape == image.shape
    assert torch.equal(image, _image())  # input untouched
    changed = _changed(out, image)
    assert changed[pred["masks"][0]].all()  # every pixel of the kept mask
    # Outside the kept mask only the box outline (2 px, already on the mask border) and the
    # label text (top-left corner inside the box, may run past its right edge) may change.
    allowed = torch.zeros(H, W, dtype=torch.bool)
    allowed[8:42, 18:62] = True
    allowed[10:30, 20:W] = True
    assert not changed[~allowed].any()
    assert not changed[pred["masks"][1]].any()  # low-score detection filtered


def test_score_threshold_filters() -> None:
    image, pred = _image(), _prediction()
    out = draw_predictions(image, pred, NAMES, score_thr=0.05)
    assert _changed(out, image)[pred["masks"][1]].all()
    assert torch.equal(draw_predictions(image, pred, NAMES, score_thr=0.95), image)


def test_reference_points_mark_their_location() -> None:
    image, pred = _image(), _prediction()
    base = draw_predictions(image, pred, NAMES)
    ref_all = torch.tensor([[0.9, 0.2], [0.05, 0.9]])  # one per prediction; only the first is kept
    out = draw_predictions(image, pred, NAMES, reference_points=ref_all)
    diff = _changed(out, base)
    assert diff[20, 144]  # (0.9 * 160, 0.2 * 100)
    assert not diff[90, 8]  # the filtered detection's point is not drawn
    assert not diff[60:, :].any() and not diff[:, :120].any()  # a small marker only
    # Points given for the kept detections only give the same image.
    assert torch.equal(draw_predictions(image, pred, NAMES, reference_points=ref_all[:1]), out)


def test_sampling_points_drawn_by_level_and_weight() -> None:
    image, pred = _image(), _prediction()
    base = draw_predictions(image, pred, NAMES)
    samples = [{"points": torch.tensor([[0.25, 0.75], [0.5, 0.75]]),
                "weights": torch.tensor([1.0, 0.1]),
                "levels": torch.tensor([0, 3])}]
    out = draw_predictions(image, pred, NAMES, sampling_points=samples)
    diff = _changed(out, base)
    assert diff[75, 40] and diff[75, 80]
    # Dot colours follow the level, and the heavier dot is larger.
    assert not torch.equal(out[:, 75, 40], out[:, 75, 80])
    assert diff[70:81, 30:51].sum() > diff[70:81, 70:91].sum()
    assert not diff[:60, :].any()


def test_save_png_round_trip(tmp_path: Path) -> None:
    img = torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8)
    path = tmp_path / "out" / "img.png"
    save_png(img, path)
    assert os.listdir(path.parent) == ["img.png"]
    with Image.open(path) as pil:
        assert pil.format == "PNG" and pil.size == (50, 30) and pil.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(pil), img.permute(1, 2, 0).numpy())
    with pytest.raises(ValueError):
        save_png(img.float(), tmp_path / "bad.png")


@pytest.mark.parametrize("with_image", [False, True])
def test_plot_reference_points(tmp_path: Path, with_image: bool) -> None:
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "ref.png"
    plot_reference_points(torch.rand(300, 2, generator=g), torch.rand(300, generator=g), path,
                          image=_image() if with_image else None)
    with Image.open(path) as pil:
        assert pil.format == "PNG" and pil.size == (640, 500)


def _write_metrics(path: Path, with_val: bool, per_epoch_iter: bool = False) -> None:
    rows = []
    for epoch in range(3):
        for i in range(20):
            it = i if per_epoch_iter else epoch * 20 + i
            rows.append({"type": "train", "epoch": epoch, "iter": it, "loss": 3.0 / (1 + epoch * 20 + i), "lr": 1e-4})
        if with_val:
            rows.append({"type": "val", "epoch": epoch, "iter": epoch * 20 + 19, "AP": 0.1 * epoch, "AP50": 0.2 * epoch})
    lines = [json.dumps(r) for r in rows] + ['{"type": "train", "ep']  # truncated last line
    path.write_text("\n".join(lines))


@pytest.mark.parametrize("with_val,per_epoch_iter", [(True, False), (False, False), (True, True)])
def test_plot_curves(tmp_path: Path, with_val: bool, per_epoch_iter: bool) -> None:
    metrics, out = tmp_path / "metrics.jsonl", tmp_path / "curves.png"
    _write_metrics(metrics, with_val, per_epoch_iter)
    plot_curves(metrics, out)
    with Image.open(out) as pil:
        assert pil.format == "PNG" and pil.size == (1100, 400)


def test_validation_points_keep_a_mid_epoch_evaluation_and_the_last_of_a_repeat():
    rows = [{"epoch": 1, "iter": 250, "AP": 0.1}, {"epoch": 2, "iter": 500, "AP": 0.2},
            {"epoch": 2, "iter": 685, "AP": 0.3}, {"epoch": 2, "iter": 500, "AP": 0.25}]  # budget stop, then a resume
    assert [(x, r["AP"]) for x, r in validation_points(rows)] == [(250, 0.1), (500, 0.25), (685, 0.3)]
    no_iter = [{"epoch": 1, "AP": 0.1}, {"epoch": 1, "AP": 0.2}]
    assert [(x, r["AP"]) for x, r in validation_points(no_iter)] == [(1, 0.2)]


def test_plot_curves_empty_file(tmp_path: Path) -> None:
    metrics, out = tmp_path / "metrics.jsonl", tmp_path / "curves.png"
    metrics.write_text("")
    plot_curves(metrics, out)
    assert out.stat().st_size > 0


def test_save_grid_common_height(tmp_path: Path) -> None:
    images = [torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8),
              torch.randint(0, 256, (3, 80, 40), dtype=torch.uint8),
              torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)]
    path = tmp_path / "grid.png"
    save_grid(images, path, padding=4)
    # Common height 40 -> widths 60, 20, 30 -> padded to 60; make_grid adds 4 px borders.
    with Image.open(path) as pil:
        assert pil.size == (3 * (60 + 4) + 4, 40 + 2 * 4)
        arr = np.asarray(pil)
    np.testing.assert_array_equal(arr[4:44, 4:64], images[0].permute(1, 2, 0).numpy())
