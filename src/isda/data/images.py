"""Image decoding for the dataset and ``isda predict``: any file PIL reads -> uint8 RGB.

Images: any PIL mode becomes 8-bit RGB. 16/32-bit integer grayscale (``I;16*``, ``I``) uses the image's own
range, not the container's: values <= 255 are taken as 8-bit, otherwise the 0.1th percentile becomes 0 and the
99.9th 255 (clipped), the microscopy convention: 12-bit or dim 16-bit data scaled by 1/257 would be near black.
Float (``F``) is taken as [0, 1] if its largest finite value is <= 1 else [0, 255], NaN/inf pixels become 0
with a warning (an inf must not scale the rest to black); alpha is dropped (the stored RGB
is kept, as OpenCV-based pipelines do); palette and CMYK go through PIL's conversion. EXIF orientation:
COCO's width/height decide. If they equal the EXIF-transposed size the transposed image is used (the
orientation a viewer shows, as detectron2/mmdet read COCO); if they equal the stored size the raw
pixels are used; if neither, the image is treated as unreadable (above).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from ..fileio import first_line
from .annotations import DataWarning

_EXIF_ORIENTATION = 0x0112


# The file types the CLI and the label-image converter read as images.
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


class UnusableImage(Exception):
    """The image could not be used (the message says why); the dataset warns and substitutes."""


def _to_rgb_uint8(img: Image.Image, path: str | os.PathLike) -> np.ndarray:
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.float64)
        if a.size and a.max() > 255:
            lo, hi = np.percentile(a, (0.1, 99.9))
            if hi <= lo:  # nearly constant but for a few pixels: their full range
                lo, hi = a.min(), a.max()
            a = (a - lo) * (255.0 / max(hi - lo, 1.0))
        gray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        a = np.asarray(img).astype(np.float64)
        finite = np.isfinite(a)
        if not finite.all():
            warnings.warn(f"{path}: {a.size - int(finite.sum())} of {a.size} pixels are NaN or inf; set to 0",
                          DataWarning, stacklevel=3)
            a = np.where(finite, a, 0.0)
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
        gray = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
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
    transposed size matches it; raises ``UnusableImage`` if neither size matches or decoding fails.
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
                    raise UnusableImage(f"image size {raw_wh[0]}x{raw_wh[1]}{extra} does not match the "
                                         f"annotation's width x height {want_wh[0]}x{want_wh[1]}")
            if use_transposed and orientation != 1:
                img = ImageOps.exif_transpose(img)
            return _to_rgb_uint8(img, path)
    except UnusableImage:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise UnusableImage(f"cannot read image ({type(e).__name__}: {first_line(e)})") from None
