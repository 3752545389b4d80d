"""COCO-format instance segmentation dataset (pycocotools), defensive about bad data.

The annotation file is validated and sanitised at construction (:mod:`.annotations`: what is refused,
what is skipped or repaired); one summary warning is issued there.

Handled when an image is loaded (counted in that process' ``dataset.skipped``; with DataLoader workers
those counters live in the workers): corrupt/unreadable image and image size matching neither the json
size nor its EXIF-transposed size (training: warn and substitute the next readable sample; evaluation,
``train=False``: warn and return a black image of the json size with no instances, so the image id and
predictions stay consistent), a mask that rasterizes to zero pixels (instance skipped).

``iscrowd=1`` annotations are never training targets but stay in ``dataset.coco`` for evaluation.
``dataset.coco`` is the COCO object of the *sanitized* annotation file: skipped annotations and
skipped images are removed (pycocotools' COCOeval would crash on some of them, e.g. a 2-point
polygon), clipped bboxes are clipped; on a clean file it equals the file's content.

Images are decoded by :func:`isda.data.images.load_rgb` (modes, EXIF orientation).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torchvision import tv_tensors

from .annotations import (
    MAX_WARNINGS_PER_REASON,
    DatasetError,
    DatasetNotFoundError,
    DataWarning,
    load_annotations,
)
from .images import UnusableImage, load_rgb
from .rle import decode_rle, to_rle

__all__ = ["CocoInstanceDataset", "coco_split_paths", "collate"]


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

        found = load_annotations(self.ann_file, self.image_dir, max_warnings_per_reason)
        self.coco, cats = found.coco, found.categories
        self.cat_ids: list[int] = [c["id"] for c in cats]
        self.class_names: list[str] = [c["name"] for c in cats]
        self.cat_id_to_label: dict[int, int] = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.ids: list[int] = found.image_ids
        self.num_classes = len(self.cat_ids)
        # Training targets (crowd regions are not): what a run needs at least one of.
        self.num_instances = sum(not a.get("iscrowd", 0) for a in self.coco.dataset["annotations"])
        self.skipped: Counter = found.skipped
        self.fixed: Counter = found.fixed
        self.problems: list[dict[str, Any]] = found.problems
        self._bad_indices: set[int] = set()
        self._load_warned: set[tuple[str, Any]] = set()
        if found.skipped or found.fixed:
            parts = [f"{r}={n}" for r, n in sorted(found.skipped.items())]
            parts_fixed = [f"{r}={n}" for r, n in sorted(found.fixed.items())]
            warnings.warn(f"{self.ann_file.name}: {len(self.ids)} images kept; skipped: {', '.join(parts) or 'none'}; "
                          f"repaired: {', '.join(parts_fixed) or 'none'} (details in dataset.problems)",
                          DataWarning, stacklevel=2)

    def require_instances(self) -> None:
        """Refuse (one line naming the file) a dataset without a single instance: training on it learns nothing
        and its AP means nothing, so a run stops before any work."""
        if self.num_instances == 0:
            raise DatasetError(f"{self.ann_file}: no usable instance in {len(self)} image(s) (field 'annotations' "
                               "holds none, or all were skipped)")

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
        transforms. Raises ``UnusableImage`` (internal) if the image cannot be used."""
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
                m = decode_rle(to_rle(ann["segmentation"], h, w))
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
        except UnusableImage as e:
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
