"""COCO annotation files: reading, validation and sanitising (no image is decoded here).

Every problem is either

* handled: a :class:`DataWarning` naming the image (file name + id) and annotation id, the item is
  skipped (or clipped), and it is counted in ``skipped`` (items dropped) or ``fixed`` (items kept after a
  repair); or
* refused: a one-line :class:`DatasetError` naming the file, the record and the field.

Refused (``DatasetError``): unreadable/malformed json, missing required keys (top level:
``images``, ``annotations``, ``categories``; image: ``id``, ``file_name``, ``height``, ``width``;
annotation: ``id``, ``image_id``, ``category_id``, ``segmentation``; category: ``id``, ``name``),
wrongly typed values, non-finite coordinates, duplicate ids, an annotation whose ``category_id`` or
``image_id`` is unknown, a missing image folder, an empty ``images`` list or one none of whose files exist.

Handled at construction (cheap, no image decoding): image file missing (image skipped), polygon with
< 3 points (that polygon dropped; the annotation skipped if none is left), zero area (declared
``area`` <= 0, an RLE with no foreground, or a polygon with zero geometric area), invalid RLE
(counts not summing to height*width, undecodable string), RLE size different from the image size,
polygon or bbox partly outside the image (the bbox is clipped; masks are rasterized in the image frame
so polygons are clipped exactly; > 1 px outside warns). Missing ``iscrowd`` defaults to 0, missing
``area``/``bbox`` are computed from the mask.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import operator
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from .rle import to_rle


class DataWarning(UserWarning):
    """A data problem that was handled (skipped, clipped, substituted); the message names it."""


class DatasetError(ValueError):
    """A data problem that is refused; the one-line message names the file, record and field."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """An annotation file or image folder does not exist (the message names the path)."""


# Detailed warnings per reason at construction; the rest are counted and listed in dataset.problems.
MAX_WARNINGS_PER_REASON = 20
# Polygons/bboxes further than this many pixels outside the image warn (bboxes are always clipped).
OUTSIDE_TOLERANCE_PX = 1.0


@dataclass
class Annotations:
    """A sanitised annotation file: ``coco`` without the skipped annotations and images, the categories
    sorted by id, the kept image ids, and what was skipped / repaired (counters and one row per problem)."""

    coco: COCO
    categories: list[dict]
    image_ids: list[int]
    skipped: Counter
    fixed: Counter
    problems: list[dict[str, Any]]


def load_annotations(ann_file: Path, image_dir: Path, max_warnings: int = MAX_WARNINGS_PER_REASON) -> Annotations:
    """Read, validate and sanitise ``ann_file`` against the files in ``image_dir`` (see the module doc)."""
    v = AnnotationValidator(ann_file, max_warnings)
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{ann_file}: not valid JSON ({e.msg} at line {e.lineno} "
                           f"column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{ann_file}: cannot read ({e})") from None
    v.check_top(data)
    cats = v.check_categories(data["categories"])
    images = v.check_images(data["images"])
    cat_ids = {c["id"] for c in cats}

    try:
        present = set(os.listdir(image_dir))
    except OSError as e:
        raise DatasetError(f"cannot list image folder {image_dir}: {e}") from None
    missing = set()
    for img_id, img in images.items():
        name = img["file_name"]
        if not (name in present if ("/" not in name and os.sep not in name) else (image_dir / name).is_file()):
            missing.add(img_id)
            v.report("missing_image_file", img, None, f"image file {image_dir / name} not found; "
                     "image skipped", skipped=True)

    # Nothing could be trained or evaluated (and the lr schedule divides by the number of batches).
    if not images:
        raise v.error("field 'images' is empty: no image to use")
    if len(missing) == len(images):
        raise v.error(f"none of the {len(images)} image files listed in 'images' is in {image_dir} "
                      f"(e.g. {next(iter(images.values()))['file_name']!r})")

    kept_anns = []
    seen_ann_ids = set()
    for i, ann in enumerate(data["annotations"]):
        v.require(ann, ("id", "image_id", "category_id", "segmentation"), f"annotations[{i}]")
        aid = ann["id"]
        if aid in seen_ann_ids:
            raise v.error(f"annotations[{i}]: duplicate annotation id {aid}")
        seen_ann_ids.add(aid)
        if not isinstance(ann["image_id"], int) or isinstance(ann["image_id"], bool):
            raise v.error(f"annotation {aid} field 'image_id' must be an integer, got {ann['image_id']!r}")
        if not isinstance(ann["category_id"], int) or isinstance(ann["category_id"], bool):
            raise v.error(f"annotation {aid} field 'category_id' must be an integer, got {ann['category_id']!r}")
        img = images.get(ann["image_id"])
        if img is None:
            raise v.error(f"annotation {aid} refers to unknown image_id {ann['image_id']!r} (no such entry "
                          "in 'images')")
        if ann["category_id"] not in cat_ids:
            known = sorted(cat_ids)
            known_s = ", ".join(map(str, known[:20])) + (", ..." if len(known) > 20 else "")
            raise v.error(f"annotation {aid} ({v.where(img)}) has unknown category_id {ann['category_id']!r} "
                          f"(known: {known_s})")
        if ann["image_id"] in missing:
            continue
        if v.check_annotation(ann, img):
            kept_anns.append(ann)

    data["annotations"] = kept_anns
    data["images"] = [img for img in data["images"] if img["id"] not in missing]
    data["categories"] = cats
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()

    return Annotations(coco, cats, sorted(img_id for img_id in images if img_id not in missing), v.skipped, v.fixed,
                       v.problems)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return _is_real(v) and math.isfinite(v)


def _numbers(values: list) -> bool:
    """All finite ints/floats (fast: C-level passes; COCO train has ~1.2M polygons)."""
    if not set(map(type, values)) <= {int, float}:
        return False
    return math.isfinite(sum(values))


def _polygon_area(poly: list[float]) -> float:
    xs, ys = poly[0::2], poly[1::2]
    a = sum(map(operator.mul, xs, ys[1:] + ys[:1])) - sum(map(operator.mul, ys, xs[1:] + xs[:1]))
    return 0.5 * abs(a)


class AnnotationValidator:
    """Validates and sanitizes a parsed COCO dict in place, collecting problems."""

    def __init__(self, ann_file: Path, max_warnings: int):
        self.ann_file = ann_file
        self.max_warnings = max_warnings
        self.skipped: Counter = Counter()
        self.fixed: Counter = Counter()
        self.problems: list[dict[str, Any]] = []
        self._warned: Counter = Counter()

    # -- reporting
    def error(self, message: str) -> DatasetError:
        return DatasetError(f"{self.ann_file}: {message}")

    def where(self, img: dict | None, ann_id: Any = None) -> str:
        parts = []
        if img is not None:
            parts.append(f"image {img.get('file_name')!r} (id {img.get('id')})")
        if ann_id is not None:
            parts.append(f"annotation {ann_id}")
        return ", ".join(parts)

    def report(self, reason: str, img: dict | None, ann_id: Any, message: str, *, skipped: bool) -> None:
        (self.skipped if skipped else self.fixed)[reason] += 1
        text = f"{self.ann_file.name}: {self.where(img, ann_id)}: {message}"
        self.problems.append({"reason": reason, "image_id": None if img is None else img.get("id"),
                              "file_name": None if img is None else img.get("file_name"),
                              "ann_id": ann_id, "message": text})
        self._warned[reason] += 1
        if self._warned[reason] <= self.max_warnings:
            warnings.warn(text, DataWarning, stacklevel=5)

    # -- structure
    def require(self, record: Any, keys: tuple[str, ...], what: str) -> None:
        if not isinstance(record, dict):
            raise self.error(f"{what} must be a JSON object, got {type(record).__name__}")
        for key in keys:
            if key not in record:
                raise self.error(f"{what} is missing the required field '{key}'")

    def check_top(self, data: Any) -> None:
        if not isinstance(data, dict):
            raise self.error(f"top level must be a JSON object, got {type(data).__name__}")
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise self.error(f"missing the required top-level field '{key}'")
            if not isinstance(data[key], list):
                raise self.error(f"field '{key}' must be a list, got {type(data[key]).__name__}")

    def check_categories(self, cats: list) -> list[dict]:
        seen = set()
        for i, cat in enumerate(cats):
            self.require(cat, ("id", "name"), f"categories[{i}]")
            if not isinstance(cat["id"], int) or isinstance(cat["id"], bool):
                raise self.error(f"categories[{i}] field 'id' must be an integer, got {cat['id']!r}")
            if cat["id"] in seen:
                raise self.error(f"categories[{i}]: duplicate category id {cat['id']}")
            seen.add(cat["id"])
        if not cats:
            raise self.error("field 'categories' is empty")
        return sorted(cats, key=lambda c: c["id"])

    def check_images(self, images: list) -> dict[int, dict]:
        by_id: dict[int, dict] = {}
        for i, img in enumerate(images):
            self.require(img, ("id", "file_name", "height", "width"), f"images[{i}]")
            if not isinstance(img["id"], int) or isinstance(img["id"], bool):
                raise self.error(f"images[{i}] ({img['file_name']!r}) field 'id' must be an integer, got {img['id']!r}")
            for key in ("height", "width"):
                v = img[key]
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise self.error(f"image {img['file_name']!r} (id {img['id']}) field '{key}' must be a "
                                     f"positive integer, got {v!r}")
            if not isinstance(img["file_name"], str) or not img["file_name"]:
                raise self.error(f"images[{i}] (id {img['id']}) field 'file_name' must be a non-empty string")
            if img["id"] in by_id:
                raise self.error(f"images[{i}] ({img['file_name']!r}): duplicate image id {img['id']}")
            by_id[img["id"]] = img
        return by_id

    def check_annotation(self, ann: dict, img: dict) -> bool:
        """Validate/sanitize one annotation in place. Returns False if it must be skipped."""
        aid = ann["id"]
        h, w = img["height"], img["width"]
        seg = ann["segmentation"]
        where = f"annotation {aid} ({self.where(img)})"
        iscrowd = ann.setdefault("iscrowd", 0)
        if iscrowd not in (0, 1, True, False):
            raise self.error(f"{where} field 'iscrowd' must be 0 or 1, got {iscrowd!r}")
        ann["iscrowd"] = int(iscrowd)

        if isinstance(seg, list):
            if seg and _numbers(seg):
                raise self.error(f"{where} field 'segmentation' must be a list of polygons "
                                 f"(a list of coordinate lists), got a flat list of numbers")
            polys, short = [], []
            for j, poly in enumerate(seg):
                if not isinstance(poly, list) or not _numbers(poly):
                    nonfinite = isinstance(poly, list) and any(_is_real(c) and not math.isfinite(c) for c in poly)
                    raise self.error(f"{where} field 'segmentation[{j}]' must be a list of numbers"
                                     + (" (it holds NaN or inf)" if nonfinite else ""))
                if len(poly) % 2:
                    raise self.error(f"{where} field 'segmentation[{j}]' has an odd number of coordinates "
                                     f"({len(poly)})")
                (polys if len(poly) >= 6 else short).append(poly)
            if not seg:
                self.report("empty_segmentation", img, aid, "segmentation is an empty list; annotation skipped",
                            skipped=True)
                return False
            if short:
                npts = ", ".join(str(len(p) // 2) for p in short)
                if not polys:
                    self.report("polygon_too_few_points", img, aid, f"polygon with < 3 points ({npts} point(s)); "
                                "annotation skipped", skipped=True)
                    return False
                self.report("polygon_part_dropped", img, aid, f"{len(short)} of {len(seg)} polygons have < 3 points "
                            f"({npts} point(s)); those parts dropped, annotation kept", skipped=False)
                ann["segmentation"] = polys
            if all(_polygon_area(p) <= 0 for p in polys):
                self.report("zero_area", img, aid, "polygon(s) enclose zero area; annotation skipped", skipped=True)
                return False
            xs = [min(min(p[0::2]) for p in polys), max(max(p[0::2]) for p in polys)]
            ys = [min(min(p[1::2]) for p in polys), max(max(p[1::2]) for p in polys)]
            t = OUTSIDE_TOLERANCE_PX
            if xs[1] <= 0 or ys[1] <= 0 or xs[0] >= w or ys[0] >= h:
                self.report("outside_image", img, aid, f"polygon lies entirely outside the {w}x{h} image; "
                            "annotation skipped", skipped=True)
                return False
            if xs[0] < -t or ys[0] < -t or xs[1] > w + t or ys[1] > h + t:
                self.report("polygon_clipped", img, aid,
                            f"polygon extends outside the {w}x{h} image (x {xs[0]:g}..{xs[1]:g}, "
                            f"y {ys[0]:g}..{ys[1]:g}); "
                            "clipped to the image", skipped=False)
        elif isinstance(seg, dict):
            if "counts" not in seg or "size" not in seg:
                missing = "counts" if "counts" not in seg else "size"
                raise self.error(f"{where} field 'segmentation' (RLE) is missing '{missing}'")
            size = seg["size"]
            if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
                raise self.error(f"{where} field 'segmentation.size' must be [height, width], got {size!r}")
            if list(size) != [h, w]:
                self.report("rle_size_mismatch", img, aid, f"RLE size {size} differs from the image size "
                            f"[{h}, {w}]; annotation skipped", skipped=True)
                return False
            counts = seg["counts"]
            if isinstance(counts, list):
                if not (set(map(type, counts)) <= {int} and (not counts or min(counts) >= 0)):
                    raise self.error(f"{where} field 'segmentation.counts' must hold non-negative integers")
                if sum(counts) != h * w:
                    self.report("invalid_rle", img, aid, f"uncompressed RLE counts sum to {sum(counts)}, "
                                f"not height*width = {h * w}; annotation skipped", skipped=True)
                    return False
                if sum(counts[1::2]) == 0:
                    self.report("zero_area", img, aid, "RLE mask is empty; annotation skipped", skipped=True)
                    return False
            elif isinstance(counts, (str, bytes)):
                try:
                    rle = {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
                    decoded_area = int(mask_utils.area(rle))
                    mask_utils.toBbox(rle)
                except Exception as e:
                    self.report("invalid_rle", img, aid, f"compressed RLE cannot be decoded ({e}); "
                                "annotation skipped", skipped=True)
                    return False
                if decoded_area <= 0:
                    self.report("zero_area", img, aid, "RLE mask is empty; annotation skipped", skipped=True)
                    return False
            else:
                raise self.error(f"{where} field 'segmentation.counts' must be a list or a string, "
                                 f"got {type(counts).__name__}")
        else:
            raise self.error(f"{where} field 'segmentation' must be a list of polygons or an RLE object, "
                             f"got {type(seg).__name__}")

        # area / bbox (COCOeval needs area; fill in what is missing)
        if "area" not in ann or "bbox" not in ann:
            rle = to_rle(ann["segmentation"], h, w)
            ann.setdefault("area", float(mask_utils.area(rle)))
            ann.setdefault("bbox", [float(v) for v in mask_utils.toBbox(rle)])
        if not _is_number(ann["area"]):
            raise self.error(f"{where} field 'area' must be a number, got {ann['area']!r}")
        if ann["area"] <= 0:
            self.report("zero_area", img, aid, f"declared area {ann['area']!r} <= 0; annotation skipped", skipped=True)
            return False
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise self.error(f"{where} field 'bbox' must be [x, y, width, height], got {bbox!r}")
        x0, y0, x1, y1 = bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]
        c = [min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h)]
        if c != [x0, y0, x1, y1]:
            t = OUTSIDE_TOLERANCE_PX
            if x0 < -t or y0 < -t or x1 > w + t or y1 > h + t:
                self.report("bbox_clipped", img, aid, f"bbox {bbox} extends outside the {w}x{h} image; clipped",
                            skipped=False)
            ann["bbox"] = [c[0], c[1], c[2] - c[0], c[3] - c[1]]
        return True
