"""Instance label images -> a COCO instance-segmentation JSON (``isda convert labels``).

Microscopy and Cityscapes-style datasets come as label images, not COCO JSON: one single-channel integer
image per image (PNG or TIFF, 8/16/32-bit; palette PNGs by their index), 0 = background, every other value
one instance. Ids need not be contiguous; all pixels of one value are ONE instance even when they form
several disconnected pieces (an occluded object), as in the label image itself.

Matching is by file stem, the files directly in each folder: the label image of ``images/001.png`` is
``labels/001.<png|tif|tiff>`` or ``001_label``, ``001_labels``, ``001_mask``, ``001_masks`` (same extensions).
An image without a label image is skipped with a warning (an unlabelled pool may share the folder); a label
image without an image is an error (labelling work that would be lost, most likely a naming mistake).

Classes: one category by default. With class maps (semantic label images matched the same way, the pixel
value is the category id, 0 = none) an instance takes the majority class under its pixels; a warning names
the file and instance when more than 10% of it lies on other classes, and an instance lying mostly on 0 is
skipped with a warning. A categories file (JSON ``{"1": "nucleus", "2": "cell"}``) names the ids and lists
them all even if unused, so that train and val converted separately have the same categories; without it
the ids found are named ``class_<id>``. Ids are kept as given (non-contiguous is fine).

Segmentations are compressed RLE (counts as str), bbox and area computed by pycocotools from the RLE.
Every refused input is a one-line :class:`DatasetError` naming the file.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..fileio import atomic_write_text, first_line
from .annotations import DatasetError, DatasetNotFoundError, DataWarning
from .images import IMAGE_EXTS, UnusableImage, load_rgb

LABEL_EXTS = (".png", ".tif", ".tiff")
LABEL_SUFFIXES = ("_label", "_labels", "_mask", "_masks")
# PIL modes holding one integer per pixel ("1": binary; "P": palette index).
_INTEGER_MODES = {"1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N"}
# More than this share of an instance on classes other than its majority one warns.
STRADDLE_SHARE = 0.10


@dataclass
class LabelConversion:
    """What :func:`labelmaps_to_coco` wrote: counts, the categories (id -> name) and the skipped images."""

    path: Path
    images: int
    instances: int
    categories: dict[int, str]
    skipped_images: list[str]
    skipped_instances: int


def labelmaps_to_coco(labels_dir: str | os.PathLike, images_dir: str | os.PathLike, out_json: str | os.PathLike,
                      *, class_maps_dir: str | os.PathLike | None = None,
                      categories: str | os.PathLike | None = None,
                      category_name: str = "object") -> LabelConversion:
    """Write ``out_json`` (atomically) for the label images in ``labels_dir`` and their images in ``images_dir``.

    The JSON is the input of ``isda train --ann``, so everything the dataset would only find out at training
    time (a size mismatch, an unreadable image, a float label image) is refused here, naming the file; see
    the module doc for matching and classes. ``category_name`` names the single category used without
    class maps or categories file.
    """
    images_dir = _folder(images_dir, "image folder")
    images = _index_images(images_dir)
    labels = _match(_folder(labels_dir, "label folder"), images_dir, images, "label image")
    class_maps = (_match(_folder(class_maps_dir, "class map folder"), images_dir, images, "class map")
                  if class_maps_dir else None)
    names = _read_categories(Path(categories)) if categories else None
    if not labels:
        raise DatasetError(f"{labels_dir}: no label images ({', '.join(LABEL_EXTS)})")
    if class_maps is None:
        if names is not None and len(names) != 1:
            raise DatasetError(f"{categories}: {len(names)} categories but no class maps to tell the instances' "
                               "classes apart (give class maps, or one category)")
        if names is None and not category_name.strip():
            raise DatasetError("the category name is empty")
        names = names or {1: category_name}

    skipped = sorted(images[s].name for s in images if s not in labels)
    if skipped:
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        warnings.warn(f"{len(skipped)} image(s) in {images_dir} have no label image in {labels_dir}; skipped: "
                      f"{', '.join(skipped[:5])}{more}", DataWarning, stacklevel=2)

    coco_images, annotations, used, dropped = [], [], set(), 0
    for stem in sorted(labels, key=lambda s: images[s].name):
        label_path, image_path = labels[stem], images[stem]
        label = _read_integer_image(label_path, "label image")
        h, w = label.shape
        _check_image(image_path, label_path, (h, w))
        classes = None
        if class_maps is not None:
            if stem not in class_maps:
                raise DatasetError(f"{label_path}: no class map for its image {image_path.name} in {class_maps_dir}")
            classes = _read_integer_image(class_maps[stem], "class map")
            if classes.shape != label.shape:
                raise DatasetError(f"{class_maps[stem]}: class map size {classes.shape[1]}x{classes.shape[0]} "
                                   f"differs from its label image {label_path.name} ({w}x{h})")
        image_id = len(coco_images) + 1
        coco_images.append({"id": image_id, "file_name": image_path.relative_to(images_dir).as_posix(),
                            "height": h, "width": w})
        fortran = np.asfortranarray(label)  # pycocotools encodes column-major masks
        for instance in np.unique(label):
            if instance == 0:
                continue
            mask = fortran == instance
            if classes is None:
                category = next(iter(names))
            else:
                category = _majority_class(classes[mask], label_path, class_maps[stem], int(instance))
                if category is None:
                    dropped += 1
                    continue
                if names is not None and category not in names:
                    raise DatasetError(f"{class_maps[stem]}: class {category} (instance {instance} of "
                                       f"{label_path.name}) is not in {categories}")
            rle = mask_utils.encode(mask.view(np.uint8))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                "area": int(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0})
            used.add(category)
    if not annotations:
        on_zero = f" ({dropped} lie on class 0 of their class map)" if dropped else ""
        raise DatasetError(f"{labels_dir}: no instance (a value other than 0) in any of the {len(labels)} "
                           f"label image(s){on_zero}")
    names = dict(sorted((names or {c: f"class_{c}" for c in used}).items()))
    coco = {"images": coco_images, "annotations": annotations,
            "categories": [{"id": c, "name": n} for c, n in names.items()]}
    atomic_write_text(out_json, json.dumps(coco))
    return LabelConversion(Path(out_json), len(coco_images), len(annotations), names, skipped, dropped)


def _folder(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DatasetNotFoundError(f"{what} not found: {path}")
    return path


def _files(folder: Path, exts: tuple[str, ...] | set[str]) -> list[Path]:
    # Hidden files include macOS "._x.tif" companions, which carry image extensions but no image.
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in exts and not f.name.startswith(".")
                  and f.is_file())


def _index_images(images_dir: Path) -> dict[str, Path]:
    images: dict[str, Path] = {}
    for f in _files(images_dir, IMAGE_EXTS):
        if f.stem in images:
            raise DatasetError(f"{f}: two images named {f.stem} ({images[f.stem].name}, {f.name}); a label image "
                               "could belong to either")
        images[f.stem] = f
    return images


def _match(folder: Path, images_dir: Path, images: dict[str, Path], what: str) -> dict[str, Path]:
    """The files of ``folder`` by the stem of their image (exact stem first, then without a LABEL_SUFFIX)."""
    matched: dict[str, Path] = {}
    for f in _files(folder, LABEL_EXTS):
        stems = [f.stem] + [f.stem[: -len(s)] for s in LABEL_SUFFIXES if f.stem.endswith(s)]
        stem = next((s for s in stems if s in images), None)
        if stem is None:
            raise DatasetError(f"{f}: {what} without an image (no {' or '.join(stems)}.* in {images_dir})")
        if stem in matched:
            raise DatasetError(f"{f}: a second {what} for {images[stem].name} (the first: {matched[stem].name})")
        matched[stem] = f
    return matched


def _read_integer_image(path: Path, what: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            array = np.array(img)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise DatasetError(f"{path}: cannot read {what} ({type(e).__name__}: {first_line(e)})") from None
    if mode not in _INTEGER_MODES:
        raise DatasetError(f"{path}: {what} of pixel mode {mode} (floating point or colour); it must hold one "
                           "integer per pixel (8/16/32-bit grayscale, 0 = background)")
    if array.size and array.min() < 0:
        raise DatasetError(f"{path}: {what} holds negative values (min {array.min()}); ids must be >= 0")
    return array


def _check_image(image_path: Path, label_path: Path, hw: tuple[int, int]) -> None:
    try:
        shape = load_rgb(image_path).shape  # EXIF-transposed: what a labelling tool showed
    except UnusableImage as e:
        raise DatasetError(f"{image_path}: {e}") from None
    if shape[:2] != hw:
        raise DatasetError(f"{label_path}: label image size {hw[1]}x{hw[0]} differs from its image "
                           f"{image_path.name} ({shape[1]}x{shape[0]})")


def _majority_class(values: np.ndarray, label_path: Path, class_path: Path, instance: int) -> int | None:
    """The class most of the instance's pixels have (None if that is 0); warns when it straddles classes."""
    classes, counts = np.unique(values, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    best, share = int(classes[order[0]]), counts[order[0]] / counts.sum()
    where = f"{label_path}: instance {instance}"
    if best == 0:
        warnings.warn(f"{where} lies mostly ({share:.0%}) on class 0 (none) in {class_path.name}; skipped",
                      DataWarning, stacklevel=3)
        return None
    if 1 - share > STRADDLE_SHARE:
        parts = ", ".join(f"{classes[i]} ({counts[i] / counts.sum():.0%})" for i in order[:4])
        warnings.warn(f"{where} straddles classes in {class_path.name}: {parts}; class {best} used",
                      DataWarning, stacklevel=3)
    return best


def _read_categories(path: Path) -> dict[int, str]:
    """``{"1": "nucleus", ...}`` -> {1: "nucleus", ...}; ids >= 1 (0 is background in class maps)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetNotFoundError(f"categories file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: not a readable JSON file ({first_line(e)})") from None
    example = 'a JSON object of category id -> name, e.g. {"1": "nucleus", "2": "cell"}'
    if not isinstance(data, dict) or not data:
        raise DatasetError(f"{path}: expected {example}")
    names: dict[int, str] = {}
    for key, name in data.items():
        try:
            cid = int(key)
        except ValueError:
            raise DatasetError(f"{path}: key {key!r} is not an integer id; expected {example}") from None
        if cid < 1 or cid in names:
            raise DatasetError(f"{path}: id {key!r} is {'a duplicate' if cid in names else '< 1'} "
                               "(0 is background)")
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{path}: the name of id {key!r} must be a non-empty string")
        names[cid] = name
    return names
