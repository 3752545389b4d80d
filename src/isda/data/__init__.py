"""Data: the COCO-format instance segmentation dataset (:mod:`.coco`), annotation validation
(:mod:`.annotations`), image decoding (:mod:`.images`), RLE helpers (:mod:`.rle`), the official augmentation
policy (:mod:`.transforms`) and the built-in synthetic shapes dataset (:mod:`.shapes`)."""

from isda.data import shapes
from isda.data.annotations import DatasetError, DatasetNotFoundError, DataWarning
from isda.data.coco import CocoInstanceDataset, coco_split_paths, collate
from isda.data.images import load_rgb
from isda.data.rle import decode_rle
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
