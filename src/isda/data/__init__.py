"""Data: COCO-format instance segmentation (:mod:`.coco`), the official augmentation policy
(:mod:`.transforms`) and the built-in synthetic shapes dataset (:mod:`.shapes`)."""

from isda.data import shapes
from isda.data.coco import (
    CocoInstanceDataset,
    DatasetError,
    DatasetNotFoundError,
    DataWarning,
    coco_split_paths,
    collate,
    decode_rle,
    load_rgb,
)
from isda.data.shapes import make_shapes_dataset
from isda.data.transforms import DropEmptyInstances, RandomSizeCrop, ShortSideResize, build_transforms

__all__ = [
    "CocoInstanceDataset",
    "DataWarning",
    "DatasetError",
    "DatasetNotFoundError",
    "DropEmptyInstances",
    "RandomSizeCrop",
    "ShortSideResize",
    "build_transforms",
    "coco_split_paths",
    "collate",
    "decode_rle",
    "load_rgb",
    "make_shapes_dataset",
    "shapes",
]
