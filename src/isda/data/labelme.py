"""labelme annotations -> a COCO instance-segmentation JSON (``isda convert labelme``).

labelme, the polygon annotation tool, saves one JSON per image: its ``shapes``, each with a ``label``, the
``points`` of a ``polygon``, ``rectangle`` (two corners) or ``circle`` (the centre, then a point on the circle),
and a ``group_id`` that joins shapes of one label into one instance (an object cut in two by an occluder);
``imagePath`` names the image, relative to the JSON, and ``imageHeight`` / ``imageWidth`` its size.

Every JSON directly in the folder is read. An instance is its shapes rasterised and merged into one mask
(compressed RLE; bbox and area by pycocotools). Categories are numbered from 1 in the order of a labels file
(labelme's ``labels.txt``: one name per line) or, without one, in the sorted order of the labels found; a label
missing from the labels file is an error, so that train and val converted apart keep the same ids. labelme's
special labels: ``_background_`` is no instance; ``__ignore__`` regions are left out with a warning (COCO has no
ignore region without a category), as are shapes that are no region (points, lines) and its ``mask`` shapes.
Every refused input is a one-line :class:`DatasetError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from ..fileio import atomic_write_text, first_line
from .annotations import DatasetError, DatasetNotFoundError, DataWarning
from .images import UnusableImage, load_rgb
from .labelmaps import LabelConversion

IGNORE, BACKGROUND = "__ignore__", "_background_"
REGIONS = ("polygon", "rectangle", "circle")
CIRCLE_VERTICES = 64  # a circle's polygon: under 0.2 % of its area lost at any radius


def labelme_to_coco(json_dir: str | os.PathLike, out_json: str | os.PathLike,
                    labels_file: str | os.PathLike | None = None) -> LabelConversion:
    """Write ``out_json`` (atomically) for the labelme JSON files in ``json_dir``; ``file_name`` of each image is
    relative to ``json_dir`` (the ``--images`` of ``isda train``)."""
    folder = Path(json_dir)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"labelme folder not found: {folder}")
    files = sorted(f for f in folder.glob("*.json") if not f.name.startswith(".") and f.is_file())
    if not files:
        raise DatasetError(f"{folder}: no labelme JSON files (*.json)")
    order = _read_labels(Path(labels_file)) if labels_file else None
    images, instances, left_out = [], [], defaultdict(int)
    for image_id, path in enumerate(files, 1):
        doc = _read_json(path)
        h, w, image = _image_of(doc, path)
        images.append({"id": image_id, "file_name": Path(os.path.relpath(image, folder)).as_posix(),
                       "height": h, "width": w})
        groups: dict[Any, list[list[float]]] = {}
        for index, shape in enumerate(doc["shapes"]):
            label, kind, polygon = _shape(shape, path, index)
            if label in (IGNORE, BACKGROUND) or kind not in REGIONS:
                left_out[label if label in (IGNORE, BACKGROUND) else f"{kind} shapes"] += 1
                continue
            group = shape.get("group_id")
            groups.setdefault((label, index) if group is None else (label, "group", group), []).append(polygon)
        for (label, *_), polygons in groups.items():
            if order is not None and label not in order:
                raise DatasetError(f"{path}: label {label!r} is not in {labels_file}")
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
            instances.append((image_id, label, rle))
    names = order or sorted({label for _, label, _ in instances})
    ids = {name: i for i, name in enumerate(names, 1)}
    annotations = [{"id": n, "image_id": image_id, "category_id": ids[label],
                    "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
                    "area": int(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0}
                   for n, (image_id, label, rle) in enumerate(instances, 1)]
    if not annotations:
        raise DatasetError(f"{folder}: no instance (a polygon, rectangle or circle) in any of the {len(files)} "
                           "labelme file(s)")
    if left_out:
        parts = ", ".join(f"{n} {what}" for what, n in sorted(left_out.items()))
        warnings.warn(f"{folder}: left out {parts} (not instance regions COCO can hold)", DataWarning, stacklevel=2)
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": name} for name, i in ids.items()]}
    atomic_write_text(out_json, json.dumps(coco))
    return LabelConversion(Path(out_json), len(images), len(annotations), {i: n for n, i in ids.items()}, [],
                           sum(left_out.values()))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: not a readable JSON file ({first_line(e)})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list) or not doc.get("imagePath"):
        raise DatasetError(f"{path}: not a labelme file (it needs 'shapes' (a list) and 'imagePath')")
    return doc


def _image_of(doc: dict[str, Any], path: Path) -> tuple[int, int, Path]:
    """The image's size and path; its recorded size must be the image's as labelme showed it (EXIF-rotated)."""
    image = path.parent / str(doc["imagePath"]).replace("\\", "/")  # saved on Windows: backslashes
    try:
        shape = load_rgb(image).shape
    except UnusableImage as e:
        raise DatasetError(f"{path}: its image {doc['imagePath']}: {e}") from None
    recorded = (doc.get("imageHeight"), doc.get("imageWidth"))
    if None not in recorded and tuple(recorded) != shape[:2]:
        raise DatasetError(f"{path}: imageHeight x imageWidth {recorded[0]}x{recorded[1]} differ from its image "
                           f"{image.name} ({shape[0]}x{shape[1]})")
    return shape[0], shape[1], image


def _shape(shape: Any, path: Path, index: int) -> tuple[str, str, list[float]]:
    """(label, shape type, flat polygon [x0, y0, x1, y1, ...]) of ``shapes[index]``."""
    where = f"{path}: shapes[{index}]"
    if not isinstance(shape, dict) or not isinstance(shape.get("label"), str) or not shape["label"].strip():
        raise DatasetError(f"{where}: no label")
    kind = shape.get("shape_type") or "polygon"  # labelme's own default
    points = shape.get("points")
    try:
        xy = [(float(x), float(y)) for x, y in points]
    except (TypeError, ValueError):
        raise DatasetError(f"{where} ({shape['label']}): points must be a list of [x, y] numbers") from None
    if not all(math.isfinite(v) for p in xy for v in p):
        raise DatasetError(f"{where} ({shape['label']}): a point is not a finite number")
    needed = {"polygon": 3, "rectangle": 2, "circle": 2}.get(kind, 0)
    if len(xy) < needed or (kind in ("rectangle", "circle") and len(xy) != 2):
        raise DatasetError(f"{where} ({shape['label']}): a {kind} needs {'at least 3' if kind == 'polygon' else 2} "
                           f"points, got {len(xy)}")
    if kind == "rectangle":
        (x0, y0), (x1, y1) = xy
        xy = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    elif kind == "circle":
        (cx, cy), (px, py) = xy
        r = math.hypot(px - cx, py - cy)
        xy = [(cx + r * math.cos(2 * math.pi * k / CIRCLE_VERTICES), cy + r * math.sin(2 * math.pi * k / CIRCLE_VERTICES))
              for k in range(CIRCLE_VERTICES)]
    return shape["label"], kind, [v for p in xy for v in p]


def _read_labels(path: Path) -> list[str]:
    """labelme's labels.txt: one name per line; blank lines, ``__ignore__`` and ``_background_`` skipped."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DatasetNotFoundError(f"labels file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not a readable text file ({first_line(e)})") from None
    names = [n.strip() for n in lines if n.strip() and n.strip() not in (IGNORE, BACKGROUND)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DatasetError(f"{path}: label(s) listed twice: {', '.join(twice)}")
    if not names:
        raise DatasetError(f"{path}: no label names (one per line)")
    return names
