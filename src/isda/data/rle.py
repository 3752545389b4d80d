"""COCO segmentations (polygons, uncompressed or compressed RLE) as pycocotools RLE, and decoding."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def decode_rle(rle: dict) -> np.ndarray:
    """``pycocotools.mask.decode`` (uint8 [H, W]) without its numpy-2 DeprecationWarning about
    ``__array__`` and ``copy`` (pycocotools 2.0.x; harmless)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*__array__")
        return mask_utils.decode(rle)


def to_rle(seg: Any, h: int, w: int) -> dict:
    """A validated segmentation of an h x w image -> one pycocotools RLE (polygons merged)."""
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, h, w)
    counts = seg["counts"]
    return {"size": seg["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
