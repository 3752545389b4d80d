"""Input size and query budget from the dataset's own statistics.

A preset's sizes assume its dataset: isda_tiny resizes every image to 128 px, which suits the shapes
dataset's 25 px objects but turns 10 px nuclei in a 256 px tile into 5 px ones, below what a 1/4-resolution
mask can draw. :func:`dataset_stats` measures the training set; :func:`fit_sizes` (``data.fit_sizes``) raises the
input size until the median instance keeps ``data.fit_instance_px`` and trains on crops of the preset's
training size at that scale (the same pixels per step, so the same cost), and predicts in windows of that size
(``data.test_window``: a model trained on crops misreads a larger input); :func:`size_warnings` says, with the
numbers, what goes wrong when the sizes are left as they are: instances shrunk below half that size, or images
with more instances than the model has queries (those extra instances can never be matched).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import DataConfig
from .transforms import short_side_size

# Largest short side fit_sizes chooses: beyond it, an image is better cut into tiles (isda predict --tile).
FIT_MAX_SIDE = 1024


@dataclass(frozen=True)
class DatasetStats:
    num_images: int
    num_instances: int
    median_short_side: float  # of the images, in pixels
    median_long_side: float
    median_instance_px: float  # sqrt(mask area) of the median instance, in the stored images' pixels
    max_instances: int  # in one image
    most_crowded: str  # that image's file name

    def instance_px_at(self, short_side: int, max_size: int) -> float:
        """The median instance's size after the median image is resized to ``short_side`` (long side capped)."""
        h, _ = short_side_size(round(self.median_short_side), round(self.median_long_side), short_side, max_size)
        return self.median_instance_px * h / self.median_short_side


def dataset_stats(coco: Any) -> DatasetStats:
    """Statistics of a pycocotools COCO object's images and (non-crowd) instances. An instance's size is
    sqrt of its ``area`` (its bbox's when the area is missing)."""
    images = coco.dataset["images"]
    anns = [a for a in coco.dataset["annotations"] if not a.get("iscrowd", 0)]
    shorts = [min(im["height"], im["width"]) for im in images] or [1]
    longs = [max(im["height"], im["width"]) for im in images] or [1]
    sizes = [math.sqrt(a["area"] if a.get("area", 0) > 0 else a["bbox"][2] * a["bbox"][3]) for a in anns]
    counts = Counter(a["image_id"] for a in anns)
    crowded_id, most = counts.most_common(1)[0] if counts else (None, 0)
    return DatasetStats(
        num_images=len(images), num_instances=len(anns),
        median_short_side=float(np.median(shorts)), median_long_side=float(np.median(longs)),
        median_instance_px=float(np.median(sizes)) if sizes else 0.0, max_instances=most,
        most_crowded=coco.imgs[crowded_id]["file_name"] if crowded_id is not None else "")


def fit_sizes(data: DataConfig, stats: DatasetStats, num_queries: int) -> tuple[DataConfig, str | None]:
    """``data`` with sizes fitted to ``stats`` (see the module doc) and a line saying what was chosen, or
    ``data`` unchanged and None when its median instance already keeps ``fit_instance_px`` (or nothing is
    known). Idempotent: fitting a fitted config changes nothing, so a resumed run keeps its sizes."""
    now = stats.instance_px_at(data.test_short_side, data.test_max_size)
    if not data.fit_sizes or stats.median_instance_px <= 0 or now >= data.fit_instance_px:
        return data, None
    side = data.test_short_side * data.fit_instance_px / now
    side = min(FIT_MAX_SIDE, max(32, 32 * round(side / 32)))
    if side <= data.test_short_side:  # within rounding of the preset's size
        return data, None
    crop = max(data.train_short_sides)
    # Crops hold a share of an image's instances; shrink them until the most crowded image's share fits half
    # the queries (the rest of the budget absorbs the spread between crops).
    scaled_area = side * side * stats.median_long_side / stats.median_short_side
    while crop > 64 and stats.max_instances * min(1.0, crop * crop / scaled_area) > num_queries / 2:
        crop -= 32
    ratio = data.test_max_size / data.test_short_side
    fitted = dataclasses.replace(
        data, test_short_side=side, test_max_size=round(side * ratio), crop_resize_short_sides=(side,),
        crop_size=(crop, crop), crop_prob=1.0, train_short_sides=(crop,), train_max_size=crop, test_window=crop)
    after = stats.instance_px_at(side, fitted.test_max_size)
    capped = f" (capped at {FIT_MAX_SIDE} px: predict large images with --tile)" if side == FIT_MAX_SIDE else ""
    return fitted, (f"input size from the data (data.fit_sizes): median instance {stats.median_instance_px:.0f} px "
                    f"in {stats.median_short_side:.0f} px images would be {now:.1f} px at "
                    f"{data.test_short_side} px; using {side} px{capped} (instances {after:.1f} px) and training on "
                    f"random {crop}x{crop} crops at that scale, predicting in {crop} px windows")


def size_warnings(data: DataConfig, stats: DatasetStats, num_queries: int, num_detections: int) -> list[str]:
    """What the sizes or the query budget will cost on this dataset, each as one line with the numbers."""
    out = []
    now = stats.instance_px_at(data.test_short_side, data.test_max_size)
    if 0 < now < data.fit_instance_px / 2:
        out.append(f"warning: median instance {stats.median_instance_px:.0f} px -> {now:.1f} px after resizing "
                   f"{stats.median_short_side:.0f} px images to {data.test_short_side} (data.test_short_side); set "
                   f"data.train_short_sides / data.test_short_side larger, or data.fit_sizes=true")
    if stats.max_instances > num_queries:
        out.append(f"warning: {stats.most_crowded} has {stats.max_instances} instances, more than "
                   f"model.num_queries={num_queries}: the rest can never be matched; set model.num_queries="
                   f"{int(1.5 * stats.max_instances)} or train on crops (data.crop_prob, data.crop_size)")
    if stats.max_instances > num_detections:
        out.append(f"warning: {stats.most_crowded} has {stats.max_instances} instances, more than "
                   f"model.num_detections={num_detections} predictions per image: set model.num_detections="
                   f"{min(num_queries, int(1.5 * stats.max_instances))}")
    return out
