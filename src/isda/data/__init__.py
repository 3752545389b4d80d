"""Data: the COCO-format instance segmentation dataset (:mod:`.coco`), annotation validation
(:mod:`.annotations`), image decoding (:mod:`.images`), RLE helpers (:mod:`.rle`), the official augmentation
policy (:mod:`.transforms`), the built-in synthetic shapes dataset (:mod:`.shapes`), instance label images
to COCO json (:mod:`.labelmaps`) and labelme files to COCO json (:mod:`.labelme`)."""

from isda.data import shapes
from isda.data.annotations import DatasetError, DatasetNotFoundError, DataWarning
from isda.data.coco import CocoInstanceDataset, coco_split_paths, collate
from isda.data.images import load_rgb
from isda.data.labelme import labelme_to_coco
from isda.data.labelmaps import LabelConversion, labelmaps_to_coco
from isda.data.rle import decode_rle
from isda.data.shapes import make_shapes_dataset
from isda.data.transforms import DropEmptyInstances, RandomSizeCrop, ShortSideResize, build_transforms

__all__ = [
    "CocoInstanceDataset",
    "DataWarning",
    "DatasetError",
    "DatasetNotFoundError",
    "DropEmptyInstances",
    "LabelConversion",
    "RandomSizeCrop",
    "ShortSideResize",
    "build_transforms",
    "coco_split_paths",
    "collate",
    "decode_rle",
    "labelme_to_coco",
    "labelmaps_to_coco",
    "load_rgb",
    "make_shapes_dataset",
    "shapes",
]
