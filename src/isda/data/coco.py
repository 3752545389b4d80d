"""COCO-format instance segmentation dataset (pycocotools), defensive about bad data.

Every problem in an annotation file or image folder is either

* handled: a :class:`DataWarning` naming the image (file name + id) and annotation id, the item is
  skipped (or clipped), and it is counted in ``dataset.skipped`` (items dropped) or ``dataset.fixed``
  (items kept after a repair); one summary warning is issued at construction; or
* refused: a one-line :class:`DatasetError` naming the file, the record and the field.

Refused (``DatasetError``): unreadable/malformed json, missing required keys (top level:
``images``, ``annotations``, ``categories``; image: ``id``, ``file_name``, ``height``, ``width``;
annotation: ``id``, ``image_id``, ``category_id``, ``segmentation``; category: ``id``, ``name``),
wrongly typed values, duplicate ids, an annotation whose ``category_id`` or ``image_id`` is unknown,
a missing image folder.

Handled at construction (cheap, no image decoding): image file missing (image skipped), polygon with
< 3 points (that polygon dropped; the annotation skipped if none is left), zero area (declared
``area`` <= 0, an RLE with no foreground, or a polygon with zero geometric area), invalid RLE
(counts not summing to height*width, undecodable string), RLE size different from the image size,
polygon or bbox partly outside the image (the bbox is clipped; masks are rasterized in the image frame
so polygons are clipped exactly; > 1 px outside warns). Missing ``iscrowd`` defaults to 0, missing
``area``/``bbox`` are computed from the mask.

Handled when an image is loaded (counted in that process' ``dataset.skipped``; with DataLoader workers
those counters live in the workers): corrupt/unreadable image and image size matching neither the json
size nor its EXIF-transposed size (training: warn and substitute the next readable sample; evaluation,
``train=False``: warn and return a black image of the json size with no instances, so the image id and
predictions stay consistent), a mask that rasterizes to zero pixels (instance skipped).

``iscrowd=1`` annotations are never training targets but stay in ``dataset.coco`` for evaluation.
``dataset.coco`` is the COCO object of the *sanitized* annotation file: skipped annotations and
skipped images are removed (pycocotools' COCOeval would crash on some of them, e.g. a 2-point
polygon), clipped bboxes are clipped; on a clean file it equals the file's content.

Images: any PIL mode becomes 8-bit RGB; 16-bit (``I;16*``, ``I``) is scaled by 1/257 (not clipped),
float (``F``) is taken as [0, 1] if its max is <= 1 else [0, 255]; alpha is dropped (the stored RGB
is kept, as OpenCV-based pipelines do); palette and CMYK go through PIL's conversion. EXIF orientation:
COCO's width/height decide. If they equal the EXIF-transposed size the transposed image is used (the
orientation a viewer shows, as detectron2/mmdet read COCO); if they equal the stored size the raw
pixels are used; if neither, the image is treated as unreadable (above).
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
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision import tv_tensors

__all__ = ["CocoInstanceDataset", "DataWarning", "DatasetError", "DatasetNotFoundError",
           "coco_split_paths", "collate", "decode_rle", "load_rgb"]


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

_EXIF_ORIENTATION = 0x0112


def coco_split_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """``(root/annotations/instances_<split>.json, root/<split>)`` — the COCO 2017 layout.

    ``coco_split_paths("/data/coco", "val2017")``; the shapes dataset uses the same layout with
    ``split="train"``/``"val"``. Raises :class:`DatasetNotFoundError` naming a missing path.
    """
    root = Path(root)
    ann_file = root / "annotations" / f"instances_{split}.json"
    image_dir = root / split
    if not ann_file.is_file():
        raise DatasetNotFoundError(f"annotation file not found: {ann_file} (expected the COCO layout "
                                   f"<root>/annotations/instances_<split>.json)")
    if not image_dir.is_dir():
        raise DatasetNotFoundError(f"image folder not found: {image_dir} (expected the COCO layout <root>/<split>/)")
    return ann_file, image_dir


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """``[(image, target), ...]`` -> ``([images], [targets])``; no padding (the model pads)."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    return images, targets


# ----------------------------------------------------------------------------------------------------
# Image decoding


class _UnusableImage(Exception):
    """Internal: the image could not be used (message says why)."""


def _to_rgb_uint8(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.float64)
        if mode == "I" and a.size and a.max() <= 255:
            gray = a  # 32-bit container holding 8-bit values
        else:
            gray = a / 257.0
        gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        a = np.asarray(img).astype(np.float64)
        scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0
        gray = np.clip(np.rint(np.nan_to_num(a) * scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("LA", "La"):
        img = img.convert("L")
    if mode == "RGBa":
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy)


def load_rgb(path: str | os.PathLike, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file to uint8 [H, W, 3] RGB (see the module doc for modes and EXIF).

    With ``expected_hw`` (the json's height/width), EXIF orientation is applied only when the
    transposed size matches it; raises ``_UnusableImage`` if neither size matches or decoding fails.
    """
    try:
        with Image.open(path) as img:
            img.load()
            raw_wh = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            transposed_wh = raw_wh[::-1] if orientation in (5, 6, 7, 8) else raw_wh
            if expected_hw is None:
                use_transposed = True
            else:
                want_wh = (expected_hw[1], expected_hw[0])
                if tuple(transposed_wh) == want_wh:
                    use_transposed = True
                elif tuple(raw_wh) == want_wh:
                    use_transposed = False
                else:
                    extra = f" (EXIF-transposed {transposed_wh[0]}x{transposed_wh[1]})" if orientation != 1 else ""
                    raise _UnusableImage(f"image size {raw_wh[0]}x{raw_wh[1]}{extra} does not match the "
                                         f"annotation's width x height {want_wh[0]}x{want_wh[1]}")
            if use_transposed and orientation != 1:
                img = ImageOps.exif_transpose(img)
            return _to_rgb_uint8(img)
    except _UnusableImage:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        detail = str(e).splitlines()[0] if str(e) else ""
        raise _UnusableImage(f"cannot read image ({type(e).__name__}: {detail})") from None


# ----------------------------------------------------------------------------------------------------
# Annotation validation


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _numbers(values: list) -> bool:
    """All finite ints/floats (fast: C-level passes; COCO train has ~1.2M polygons)."""
    if not set(map(type, values)) <= {int, float}:
        return False
    return math.isfinite(sum(values))


def _polygon_area(poly: list[float]) -> float:
    xs, ys = poly[0::2], poly[1::2]
    a = sum(map(operator.mul, xs, ys[1:] + ys[:1])) - sum(map(operator.mul, ys, xs[1:] + xs[:1]))
    return 0.5 * abs(a)


class _Validator:
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
            warnings.warn(text, DataWarning, stacklevel=4)

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
                    raise self.error(f"{where} field 'segmentation[{j}]' must be a list of numbers")
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
            rle = _to_rle(ann["segmentation"], h, w)
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


def decode_rle(rle: dict) -> np.ndarray:
    """``pycocotools.mask.decode`` (uint8 [H, W]) without its numpy-2 DeprecationWarning about
    ``__array__`` and ``copy`` (pycocotools 2.0.x; harmless)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*__array__")
        return mask_utils.decode(rle)


def _to_rle(seg: Any, h: int, w: int) -> dict:
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, h, w)
    counts = seg["counts"]
    return {"size": seg["size"], "counts": counts.encode() if isinstance(counts, str) else counts}


# ----------------------------------------------------------------------------------------------------
# Dataset


class CocoInstanceDataset(torch.utils.data.Dataset):
    """COCO instance segmentation: ``ds[i] -> (image, target)``.

    ``image``: float32 [3, H, W] in [0, 1] (after ``transforms``). ``target``: ``labels`` int64 [N]
    (contiguous 0..C-1), ``masks`` bool [N, H, W], ``image_id`` (int, COCO id), ``orig_size``
    ``(H0, W0)`` of the stored image. ``transforms(image, target)`` receives a uint8
    ``tv_tensors.Image`` and ``masks`` as a bool ``tv_tensors.Mask``. Crowd annotations are excluded
    from targets. See the module docstring for how bad data is handled.
    """

    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike,
                 transforms: Callable | None = None, train: bool = True,
                 max_warnings_per_reason: int = MAX_WARNINGS_PER_REASON):
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        self.train = train
        if not self.ann_file.is_file():
            raise DatasetNotFoundError(f"annotation file not found: {self.ann_file}")
        if not self.image_dir.is_dir():
            raise DatasetNotFoundError(f"image folder not found: {self.image_dir} (for {self.ann_file})")

        v = _Validator(self.ann_file, max_warnings_per_reason)
        try:
            with open(self.ann_file, "rb") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{self.ann_file}: not valid JSON ({e.msg} at line {e.lineno} "
                               f"column {e.colno})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"{self.ann_file}: cannot read ({e})") from None
        v.check_top(data)
        cats = v.check_categories(data["categories"])
        images = v.check_images(data["images"])
        cat_ids = {c["id"] for c in cats}

        try:
            present = set(os.listdir(self.image_dir))
        except OSError as e:
            raise DatasetError(f"cannot list image folder {self.image_dir}: {e}") from None
        missing = set()
        for img_id, img in images.items():
            name = img["file_name"]
            if not (name in present if ("/" not in name and os.sep not in name) else (self.image_dir / name).is_file()):
                missing.add(img_id)
                v.report("missing_image_file", img, None, f"image file {self.image_dir / name} not found; "
                         "image skipped", skipped=True)

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

        self.coco = coco
        self.cat_ids: list[int] = [c["id"] for c in cats]
        self.class_names: list[str] = [c["name"] for c in cats]
        self.cat_id_to_label: dict[int, int] = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.ids: list[int] = sorted(img_id for img_id in images if img_id not in missing)
        self.num_classes = len(self.cat_ids)
        self.skipped: Counter = v.skipped
        self.fixed: Counter = v.fixed
        self.problems: list[dict[str, Any]] = v.problems
        self._bad_indices: set[int] = set()
        self._load_warned: set[tuple[str, Any]] = set()
        if v.skipped or v.fixed:
            parts = [f"{r}={n}" for r, n in sorted(v.skipped.items())]
            parts_fixed = [f"{r}={n}" for r, n in sorted(v.fixed.items())]
            warnings.warn(f"{self.ann_file.name}: {len(self.ids)} images kept; skipped: {', '.join(parts) or 'none'}; "
                          f"repaired: {', '.join(parts_fixed) or 'none'} (details in dataset.problems)",
                          DataWarning, stacklevel=2)

    # -- label mapping
    def label_to_cat_id(self, label: int) -> int:
        return self.cat_ids[int(label)]

    def __len__(self) -> int:
        return len(self.ids)

    def _warn_load(self, reason: str, message: str, key: Any = None) -> None:
        """Count and warn once per (reason, key) in this process (not again every epoch)."""
        if key is not None:
            if (reason, key) in self._load_warned:
                return
            self._load_warned.add((reason, key))
        self.skipped[reason] += 1
        warnings.warn(f"{self.ann_file.name}: {message}", DataWarning, stacklevel=3)

    def load(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        """Image (uint8 tv_tensors.Image) and target (``masks`` as a bool tv_tensors.Mask) before
        transforms. Raises ``_UnusableImage`` (internal) if the image cannot be used."""
        img_id = self.ids[index]
        info = self.coco.imgs[img_id]
        h, w = info["height"], info["width"]
        where = f"image {info['file_name']!r} (id {img_id})"
        arr = load_rgb(self.image_dir / info["file_name"], expected_hw=(h, w))
        labels, masks = [], []
        for ann in self.coco.imgToAnns.get(img_id, []):
            if ann.get("iscrowd", 0):
                continue
            try:
                m = decode_rle(_to_rle(ann["segmentation"], h, w))
            except Exception as e:  # validated at construction; defensive
                self._warn_load("invalid_mask", f"{where}, annotation {ann['id']}: mask cannot be decoded ({e}); "
                                "instance skipped", key=ann["id"])
                continue
            if not m.any():
                self._warn_load("zero_area", f"{where}, annotation {ann['id']}: mask has no pixels inside the "
                                "image; instance skipped", key=ann["id"])
                continue
            labels.append(self.cat_id_to_label[ann["category_id"]])
            masks.append(m.astype(bool))
        image = tv_tensors.Image(torch.from_numpy(arr).permute(2, 0, 1).contiguous())
        mask_t = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.bool)
        target = {
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": tv_tensors.Mask(mask_t),
            "image_id": int(img_id),
            "orig_size": (int(h), int(w)),
        }
        return image, target

    def _placeholder(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        img_id = self.ids[index]
        info = self.coco.imgs[img_id]
        h, w = info["height"], info["width"]
        return tv_tensors.Image(torch.zeros((3, h, w), dtype=torch.uint8)), {
            "labels": torch.zeros((0,), dtype=torch.int64),
            "masks": tv_tensors.Mask(torch.zeros((0, h, w), dtype=torch.bool)),
            "image_id": int(img_id),
            "orig_size": (int(h), int(w)),
        }

    def _load_checked(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]] | None:
        try:
            return self.load(index)
        except _UnusableImage as e:
            info = self.coco.imgs[self.ids[index]]
            action = "substituting another sample" if self.train else "using a black placeholder with no instances"
            self._bad_indices.add(index)
            self._warn_load("unreadable_image", f"image {info['file_name']!r} (id {info['id']}) at "
                            f"{self.image_dir / info['file_name']}: {e}; {action}")
            return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        sample = None if index in self._bad_indices else self._load_checked(index)
        if sample is None:
            if not self.train:
                sample = self._placeholder(index)
            else:
                for k in range(1, len(self)):
                    j = (index + k) % len(self)
                    if j in self._bad_indices:
                        continue
                    sample = self._load_checked(j)
                    if sample is not None:
                        break
                if sample is None:
                    raise DatasetError(f"{self.ann_file}: no readable image left in {self.image_dir} "
                                       f"(all {len(self)} failed to load)")
        image, target = sample
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        image = torch.as_tensor(image).as_subclass(torch.Tensor)
        if image.dtype == torch.uint8:
            image = image.to(torch.float32).div_(255.0)
        elif image.dtype != torch.float32:
            image = image.to(torch.float32)
        target["masks"] = torch.as_tensor(target["masks"]).as_subclass(torch.Tensor).to(torch.bool)
        target["labels"] = torch.as_tensor(target["labels"]).as_subclass(torch.Tensor)
        return image, target

    def __repr__(self) -> str:
        return (f"CocoInstanceDataset({str(self.ann_file)!r}, {str(self.image_dir)!r}, images={len(self)}, "
                f"classes={self.num_classes}, train={self.train})")
