"""Visualisation: drawn pixels land where they should, files are valid PNGs of the right size."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import masks_to_boxes

from isda.visualize import (draw_ground_truth, draw_predictions, place_labels, plot_curves, plot_reference_points,
                            plot_sampling_points, save_grid, save_png, validation_points)

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
    out = draw_predictions(image, pred, NAMES, score_thr=0.3, short_side=0)  # at the image's own size
    assert out.dtype == torch.uint8 and out.shape == image.shape
    assert torch.equal(image, _image())  # input untouched
    changed = _changed(out, image)
    assert changed[pred["masks"][0]].all()  # every pixel of the kept mask
    assert not changed[pred["masks"][1]].any()  # low-score detection filtered
    # Outside the kept mask only the box outline and one label (with its leader line) may change.
    near = torch.zeros(H, W, dtype=torch.bool)
    near[8:42, 18:62] = True
    assert 0 < changed[~near].sum() <= 100 * 20


def test_drawn_at_display_size_with_ground_truth_alike() -> None:
    image, pred = _image(), _prediction()
    out = draw_predictions(image, pred, NAMES)
    assert out.shape == (3, 384, round(160 * 3.84))  # short side 100 -> 384
    gt = draw_ground_truth(image, {"labels": pred["labels"], "masks": pred["masks"]}, NAMES)
    assert gt.shape == out.shape
    # Same class colour for a prediction and its ground truth: the kept mask's centre pixel matches.
    assert torch.equal(out[:, 96, 154], gt[:, 96, 154])
    big = torch.full((3, 480, 640), 128, dtype=torch.uint8)  # already large: drawn as it is
    assert draw_predictions(big, {k: v[:0] for k, v in pred.items()}, NAMES).shape == big.shape


def _crowd(n: int = 30, size: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """n overlapping discs and squares, all of one class, in a size x size image."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        cx, cy = (torch.rand(2, generator=g) * (size - 16) + 8).tolist()
        r = 4 + 6 * float(torch.rand(1, generator=g))
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        masks[i] = disc if i % 2 else ((xx - cx).abs() <= r) & ((yy - cy).abs() <= r)
    return {"masks": masks, "boxes": masks_to_boxes(masks), "labels": torch.arange(n) % 2,
            "scores": torch.linspace(0.99, 0.5, n)}


def test_labels_of_a_crowded_image_overlap_neither_each_other_nor_their_mask() -> None:
    crowd = _crowd()
    masks = torch.nn.functional.interpolate(crowd["masks"][None].float(), scale_factor=3, mode="nearest")[0] > 0.5
    sizes = [(90, 20)] * len(masks)  # "circle 0.87" at the display font size
    rects = place_labels(sizes, crowd["boxes"] * 3, masks)
    assert None not in rects
    for i, (x0, y0, x1, y1) in enumerate(rects):
        assert (x1 - x0, y1 - y0) == sizes[i] and 0 <= x0 and 0 <= y0 and x1 <= 384 and y1 <= 384
        assert not masks[i, y0:y1, x0:x1].any(), f"label {i} covers its own mask"
        for j, (a0, b0, a1, b1) in enumerate(rects[:i]):
            assert x1 <= a0 or a1 <= x0 or y1 <= b0 or b1 <= y0, f"labels {j} and {i} overlap"
    # Alone, a label sits right above its box's top-left corner; at the image's top edge, beside the mask.
    square = torch.zeros(1, 200, 200, dtype=torch.bool)
    square[0, 100:151, 100:151] = True
    assert place_labels([(50, 20)], torch.tensor([[100.0, 100.0, 150.0, 150.0]]), square) == [(100, 79, 150, 99)]
    square = torch.zeros(1, 200, 200, dtype=torch.bool)
    square[0, :151, 100:151] = True
    x0, y0, x1, y1 = place_labels([(50, 20)], torch.tensor([[100.0, 0.0, 150.0, 150.0]]), square)[0]
    assert not square[0, y0:y1, x0:x1].any() and (x1, y0) == (100, 0)


def test_labels_beyond_the_room_are_left_out() -> None:
    rects = place_labels([(100, 100)] * 6, torch.zeros(6, 4), torch.zeros(6, 200, 200, dtype=torch.bool))
    assert rects[0] == (0, 0, 100, 100) and rects.count(None) >= 2


def test_crowded_image_draws_every_label_in_its_colour() -> None:
    crowd = _crowd()
    out = draw_predictions(torch.full((3, 128, 128), 90, dtype=torch.uint8), crowd, ["square", "circle"])
    assert out.shape == (3, 384, 384)


def test_sampling_points_figure(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    pred = _prediction()
    pred["reference_points"] = torch.tensor([[0.25, 0.25], [0.8, 0.75]])
    pred["sampling_locations"] = torch.rand(2, 8, 4, 4, 2, generator=g)
    pred["sampling_weights"] = torch.rand(2, 8, 4, 4, generator=g).softmax(-1)
    path = tmp_path / "sampling.png"
    plot_sampling_points(_image(), pred, NAMES, path)
    with Image.open(path) as pil:  # 2 x 2 panels of 5.6 in at 100 dpi, plus the legend
        assert pil.size == (1120, round(100 * (5.6 * 2 * H / W + 1.4)))


def test_score_threshold_filters() -> None:
    image, pred = _image(), _prediction()
    out = draw_predictions(image, pred, NAMES, score_thr=0.05, short_side=0)
    assert _changed(out, image)[pred["masks"][1]].all()
    assert torch.equal(draw_predictions(image, pred, NAMES, score_thr=0.95, short_side=0), image)


def test_reference_points_mark_their_location() -> None:
    image, pred = _image(), _prediction()
    base = draw_predictions(image, pred, NAMES, short_side=0)
    ref_all = torch.tensor([[0.9, 0.2], [0.05, 0.9]])  # one per prediction; only the first is kept
    out = draw_predictions(image, pred, NAMES, reference_points=ref_all, short_side=0)
    diff = _changed(out, base)
    assert diff[20, 144]  # (0.9 * 160, 0.2 * 100)
    assert not diff[90, 8]  # the filtered detection's point is not drawn
    assert not diff[60:, :].any() and not diff[:, :120].any()  # a small marker only
    # Points given for the kept detections only give the same image.
    assert torch.equal(draw_predictions(image, pred, NAMES, reference_points=ref_all[:1], short_side=0), out)


def test_sampling_points_drawn_by_level_and_weight() -> None:
    image, pred = _image(), _prediction()
    base = draw_predictions(image, pred, NAMES, short_side=0)
    samples = [{"points": torch.tensor([[0.25, 0.75], [0.5, 0.75]]),
                "weights": torch.tensor([1.0, 0.1]),
                "levels": torch.tensor([0, 3])}]
    out = draw_predictions(image, pred, NAMES, sampling_points=samples, short_side=0)
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


def test_save_grid_rows_and_captions(tmp_path: Path) -> None:
    images = [torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8),
              torch.randint(0, 256, (3, 80, 40), dtype=torch.uint8),
              torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)]
    path = tmp_path / "grid.png"
    save_grid(images, path, ncols=2, padding=4)
    # Common height 40 -> widths 60, 20, 30 in 60 px cells; two rows of two cells, 4 px apart.
    with Image.open(path) as pil:
        assert pil.size == (4 + 2 * (60 + 4), 4 + 2 * (40 + 4))
        arr = np.asarray(pil)
    np.testing.assert_array_equal(arr[4:44, 4:64], images[0].permute(1, 2, 0).numpy())
    save_grid(images, path, captions=["a", "b", "c"], ncols=3, padding=4)  # a caption strip above each
    with Image.open(path) as pil:
        assert pil.size[0] == 4 + 3 * (60 + 4) and pil.size[1] > 4 + 40 + 4 + 12
