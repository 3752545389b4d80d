"""A second generated dataset that no recipe was tuned on ("held-out family"), for the accuracy section.

It differs from :mod:`isda.data.shapes` in everything a preset might have silently adapted to: other shape
families (:data:`CLASSES`), smaller and more objects (3-12 per image, circumradius 4-12 % of the side instead of
2-6 at 8-22 %), 160 px images instead of 128, flat noisy backgrounds instead of gradients with blotches, JPEG
instead of PNG (the masks are the drawn shapes, the pixels carry JPEG's ringing), six classes instead of five and
non-contiguous category ids (:data:`CATEGORY_IDS`). Instances do not overlap (no occlusion either).

Deterministic like the shapes generator: image ``i`` of a split depends only on ``(seed, split, i)``
(:func:`isda.data.shapes.image_rng`); a complete copy with the same parameters on disk is reused.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_utils

from isda.data.shapes import _fill, _polygon, _random_colour, _random_style, image_rng
from isda.fileio import atomic_write_bytes

CLASSES: tuple[str, ...] = ("hexagon", "cross", "ellipse", "chevron", "crescent", "diamond")
CATEGORY_IDS: tuple[int, ...] = (3, 7, 8, 15, 31, 42)  # non-contiguous on purpose
IMAGE_SIZE = 160
JPEG_QUALITY = 80
KNOBS: dict[str, Any] = {"min_instances": 3, "max_instances": 12, "min_radius_frac": 0.04, "max_radius_frac": 0.12,
                         "background_noise": 12.0, "texture_prob": 0.3, "min_contrast": 70.0, "max_tries": 30}
FORMAT_VERSION = 1
_MAX5 = ImageFilter.MaxFilter(5)  # grows a mask by 2 px


def _rotate(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def shape_mask(name: str, cx: float, cy: float, r: float, angle: float, h: int, w: int) -> np.ndarray:
    """bool [h, w] mask of one shape of family ``name`` centred at (cx, cy) with circumradius ``r``."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if name == "hexagon":
        draw.polygon(_polygon(6, cx, cy, r, angle), fill=1)
    elif name == "diamond":  # a rhombus, long axis r, short axis r / 2
        draw.polygon(_rotate([(r, 0), (0, r / 2), (-r, 0), (0, -r / 2)], cx, cy, angle), fill=1)
    elif name == "cross":
        t = r / 3
        for pts in ([(-r, -t), (r, -t), (r, t), (-r, t)], [(-t, -r), (t, -r), (t, r), (-t, r)]):
            draw.polygon(_rotate(pts, cx, cy, angle), fill=1)
    elif name == "ellipse":  # polygonised so that it can rotate
        draw.polygon(_rotate([(r * math.cos(a), 0.5 * r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 32,
                                                                                         endpoint=False)],
                             cx, cy, angle), fill=1)
    elif name == "chevron":
        draw.polygon(_rotate([(-r, -r), (0, -r / 3), (r, -r), (r, -r / 3), (0, r / 3), (-r, -r / 3)], cx, cy, angle),
                     fill=1)
    elif name == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        ox, oy = cx + 0.5 * r * math.cos(angle), cy + 0.5 * r * math.sin(angle)
        draw.ellipse([ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r], fill=0)
    else:  # pragma: no cover - CLASSES and this function change together
        raise AssertionError(name)
    return np.asarray(canvas, dtype=np.uint8).astype(bool)


def generate_image(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One image (uint8 [size, size, 3], before JPEG) and its instances ``(class index, bool mask)``."""
    k = KNOBS
    base = _random_colour(rng) * 0.8
    image = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    image = image + rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(k["background_noise"])
    taken = np.zeros((size, size), bool)
    instances: list[tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(k["min_instances"], k["max_instances"] + 1))):
        label = int(rng.integers(len(CLASSES)))
        style = _random_style(rng, k["texture_prob"])
        if float(np.abs(style.colour - base).sum()) < k["min_contrast"]:
            style.colour = 255 - style.colour  # keep it visible on the flat background
        r = float(rng.uniform(k["min_radius_frac"], k["max_radius_frac"])) * size
        for _ in range(k["max_tries"]):
            cx, cy = (float(v) for v in rng.uniform(r, size - r, 2))
            mask = shape_mask(CLASSES[label], cx, cy, r, float(rng.uniform(0, 2 * math.pi)), size, size)
            # Two pixels of background between instances: their boundaries stay visible.
            grown = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(_MAX5)) > 0
            if mask.sum() >= 20 and not (grown & taken).any():
                ys, xs = np.nonzero(mask)
                image[ys, xs] = _fill(style, rng, ys.astype(np.float32), xs.astype(np.float32))
                taken |= mask
                instances.append((label, mask))
                break
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), instances


def generate_split(root: Path, split: str, num_images: int, seed: int) -> tuple[Path, Path]:
    """``root/<split>/*.jpg`` and ``root/annotations/instances_<split>.json`` (reused when complete and current)."""
    params = {"format_version": FORMAT_VERSION, "split": split, "num_images": num_images, "seed": seed,
              "size": IMAGE_SIZE, "jpeg_quality": JPEG_QUALITY, "knobs": KNOBS}
    ann_file, image_dir = root / "annotations" / f"instances_{split}.json", root / split
    try:
        if json.loads(ann_file.read_text())["info"]["heldout_shapes"] == params:
            return ann_file, image_dir
    except (OSError, ValueError, KeyError):
        pass
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        image, instances = generate_image(image_rng(seed, "heldout-" + split, i))
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
        atomic_write_bytes(image_dir / f"{i:06d}.jpg", buf.getvalue())
        images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "height": IMAGE_SIZE, "width": IMAGE_SIZE})
        for label, mask in instances:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": CATEGORY_IDS[label],
                                "segmentation": {"size": [IMAGE_SIZE, IMAGE_SIZE], "counts": rle["counts"].decode()},
                                "area": int(mask.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                                "iscrowd": 0})
    data = {"info": {"description": "isda benchmark held-out shapes family", "heldout_shapes": params},
            "images": images, "annotations": annotations,
            "categories": [{"id": c, "name": n, "supercategory": "shape"} for c, n in zip(CATEGORY_IDS, CLASSES)]}
    atomic_write_bytes(ann_file, json.dumps(data, separators=(",", ":")).encode())  # last: marks the copy complete
    return ann_file, image_dir


def make_heldout_dataset(root: str | Path, num_train: int = 2000, num_test: int = 200,
                         seed: int = 0) -> dict[str, tuple[Path, Path]]:
    """The family's train and test splits under ``root``: ``{"train": (ann, images), "test": (ann, images)}``."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    return {split: generate_split(root, split, n, seed) for split, n in (("train", num_train), ("test", num_test))}
