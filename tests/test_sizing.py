"""Input size and query budget from the dataset's statistics (isda.data.sizing) and what training does with them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from isda import engine
from isda.config import get_preset, load_config
from isda.data.sizing import DatasetStats, fit_sizes, size_warnings

from engine_utils import single_thread, tiny_config


def stats(instance_px: float, short: int = 256, long: int = 256, crowd: int = 30) -> DatasetStats:
    return DatasetStats(num_images=3, num_instances=3 * crowd, median_short_side=short, median_long_side=long,
                        median_instance_px=instance_px, max_instances=crowd, most_crowded="tile_1.png")


def test_small_instances_raise_the_input_size_and_train_on_crops_of_the_same_cost():
    data = dataclasses.replace(get_preset("isda_tiny").data, fit_sizes=True)
    s = stats(10.0)  # nuclei of 10 px in 256 px tiles: 5 px at the preset's 128 px
    fitted, line = fit_sizes(data, s, num_queries=100)
    assert fitted.test_short_side == 608 and fitted.crop_resize_short_sides == (608,)
    assert s.instance_px_at(fitted.test_short_side, fitted.test_max_size) >= 0.95 * data.fit_instance_px
    assert (fitted.crop_prob, fitted.crop_size, fitted.train_short_sides) == (1.0, (128, 128), (128,))
    assert fitted.test_window == 128  # predicted in windows of the crops it trained on
    assert "median instance 10 px in 256 px images would be 5.0 px at 128 px; using 608 px" in line
    # Idempotent: a resumed run (its saved config already fitted) keeps the same sizes.
    assert fit_sizes(fitted, s, num_queries=100) == (fitted, None)


def test_sizes_that_already_suit_the_data_are_kept():
    data = dataclasses.replace(get_preset("isda_tiny").data, fit_sizes=True)
    assert fit_sizes(data, stats(25.0, 128, 128), 100) == (data, None)  # the shapes dataset
    off = dataclasses.replace(data, fit_sizes=False)
    assert fit_sizes(off, stats(10.0), 100) == (off, None)  # switched off
    assert get_preset("isda_tiny").data.fit_sizes and not get_preset("isda_r50_coco").data.fit_sizes


def test_crops_shrink_until_a_crowded_image_fits_the_query_budget():
    data = dataclasses.replace(get_preset("isda_tiny").data, fit_sizes=True)
    crowded = stats(10.0, crowd=3000)  # 133 instances in a 128 px crop at 608 px
    fitted, _ = fit_sizes(data, crowded, num_queries=100)
    crop = fitted.crop_size[0]
    assert crop < 128 and 3000 * crop**2 / fitted.test_short_side**2 <= 50
    assert fitted.test_window == crop


def test_warnings_give_the_numbers_and_what_to_set():
    paper = get_preset("isda_r50_coco").data  # no fitting: the paper's sizes
    lines = size_warnings(paper, stats(4.0, 1600, 1600, crowd=400), num_queries=300, num_detections=100)
    assert lines[0] == ("warning: median instance 4 px -> 2.0 px after resizing 1600 px images to 800 "
                        "(data.test_short_side); set data.train_short_sides / data.test_short_side larger, "
                        "or data.fit_sizes=true")
    assert "tile_1.png has 400 instances, more than model.num_queries=300" in lines[1]
    assert "model.num_queries=600" in lines[1]
    assert "more than model.num_detections=100" in lines[2]
    assert size_warnings(paper, stats(60.0, 800, 1333, crowd=20), 300, 100) == []


def _tiles(root: Path, count: int = 3, side: int = 256, spot: int = 10) -> tuple[Path, Path]:
    """Dark tiles with bright squares of ``spot`` px on a grid: dense small objects, one class."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "spot"}]}
    for i in range(count):
        pixels = rng.integers(0, 40, (side, side, 3), dtype=np.uint8)
        for y in range(8, side - spot, 3 * spot):
            for x in range(8, side - spot, 3 * spot):
                pixels[y:y + spot, x:x + spot] = 220
                m = np.zeros((side, side), np.uint8, order="F")
                m[y:y + spot, x:x + spot] = 1
                rle = mask_utils.encode(m)
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": 1,
                                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                                            "area": spot * spot, "bbox": [x, y, spot, spot], "iscrowd": 0})
        Image.fromarray(pixels).save(images / f"tile_{i}.png")
        coco["images"].append({"id": i + 1, "file_name": f"tile_{i}.png", "height": side, "width": side})
    ann = root / "train.json"
    ann.write_text(json.dumps(coco))
    return ann, images


def test_training_fits_sizes_warns_about_crowding_and_records_the_sizes(tmp_path):
    ann, images = _tiles(tmp_path)  # 64 spots per tile, 3 tiles
    cfg = tiny_config(fit_sizes=True, batch_size=8, epochs=30, num_queries=50, num_detections=40)
    messages: list[str] = []
    with single_thread():
        summary = engine.train(cfg, ann, images, ann, images, out_dir=tmp_path / "run", max_iters=2,
                               log=messages.append)
    assert summary["iteration"] == 2
    text = "\n".join(messages)
    assert "input size from the data (data.fit_sizes): median instance 10 px in 256 px images" in text
    assert "tile_0.png has 64 instances, more than model.num_queries=50" in text
    # 3 images fill a batch of 8 when each is seen 8 times per epoch (24 samples: 3 full batches).
    assert "training on 3 images (each 8 times per epoch: fewer than a batch)" in text
    assert "planned: 30 epochs x 3 steps = 90 optimizer steps" in text
    assert "warning: only 90 optimizer steps planned (3 step(s) per epoch of 3 images at 8 per step)" in text
    saved = load_config(tmp_path / "run" / "config.yaml").data  # predict and eval use these sizes
    assert saved.test_short_side > cfg.data.test_short_side and saved.crop_prob == 1.0
    assert saved.test_window == saved.crop_size[0]
