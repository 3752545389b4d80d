"""The official ISDA / Deformable-DETR augmentation policy on torchvision.transforms.v2.

Train (``build_transforms(cfg, train=True)``)::

    RandomHorizontalFlip(p=cfg.flip_prob)
    RandomChoice(p = [1 - cfg.crop_prob, cfg.crop_prob]):
        ShortSideResize(cfg.train_short_sides, max_size=cfg.train_max_size)
        [ShortSideResize(cfg.crop_resize_short_sides),            # no long-side limit
         RandomSizeCrop(*cfg.crop_size),                          # h, w drawn independently
         ShortSideResize(cfg.train_short_sides, max_size=cfg.train_max_size)]
    DropEmptyInstances()                                          # instances cropped away
    ToDtype(float32, scale=True)                                  # image only

Test: ``ShortSideResize([cfg.test_short_side], max_size=cfg.test_max_size)`` then ``ToDtype``.

Inputs are ``(image, target)`` with the image a ``tv_tensors.Image`` (uint8 or float) and
``target["masks"]`` a ``tv_tensors.Mask`` [N, H, W]; per-instance plain tensors in the target
(``labels``, and any other tensor whose first dimension is N) are kept in step with the masks when
instances are dropped. Images are resized bilinearly (antialiased); masks with nearest-exact, which
samples each output pixel's centre, so masks stay aligned with the pixels. Randomness comes from
torch's global generator (seed it, or rely on DataLoader's per-worker seeding).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from isda.config import DataConfig

__all__ = ["ShortSideResize", "RandomSizeCrop", "DropEmptyInstances", "build_transforms", "short_side_size"]


def short_side_size(height: int, width: int, short_side: int, max_size: int | None) -> tuple[int, int]:
    """Output (h, w) for "short side = ``short_side``, long side <= ``max_size``", aspect preserved.

    If scaling the short side to ``short_side`` would make the long side exceed ``max_size``, the long
    side becomes exactly ``max_size`` instead (mmdet ``keep_ratio`` / torchvision ``max_size``).
    Sides are rounded to the nearest integer (at least 1).
    """
    short, long = min(height, width), max(height, width)
    scale = short_side / short
    if max_size is not None and long * scale > max_size:
        scale = max_size / long
    new_h = max(1, int(height * scale + 0.5))
    new_w = max(1, int(width * scale + 0.5))
    if max_size is not None:  # guard against rounding up past the limit
        new_h, new_w = min(new_h, max_size), min(new_w, max_size)
    return new_h, new_w


class ShortSideResize(v2.Transform):
    """Resize so the short side is one of ``sizes`` (drawn uniformly), long side <= ``max_size``.

    Images: bilinear with antialiasing. Masks: nearest-exact (pixel-centre sampling). Other v2 types
    (boxes, ...) go through ``F.resize``.
    """

    def __init__(self, sizes: int | Sequence[int], max_size: int | None = None):
        super().__init__()
        self.sizes = [int(sizes)] if isinstance(sizes, int) else [int(s) for s in sizes]
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"ShortSideResize: sizes must be positive, got {sizes!r}")
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        short = self.sizes[int(torch.randint(len(self.sizes), ()))] if len(self.sizes) > 1 else self.sizes[0]
        return {"size": list(short_side_size(h, w, short, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return F.resize(inpt, params["size"], interpolation=v2.InterpolationMode.NEAREST_EXACT)
        return self._call_kernel(F.resize, inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR,
                                 antialias=True)


class RandomSizeCrop(v2.Transform):
    """Crop a random window whose height and width are drawn independently from
    ``[min(side, min_size), min(side, max_size)]`` (mmdet ``RandomCrop(crop_type='absolute_range')``)."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        if not 1 <= min_size <= max_size:
            raise ValueError(f"RandomSizeCrop: need 1 <= min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = int(min_size), int(max_size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        ch = int(torch.randint(min(h, self.min_size), min(h, self.max_size) + 1, ()))
        cw = int(torch.randint(min(w, self.min_size), min(w, self.max_size) + 1, ()))
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class DropEmptyInstances:
    """Remove instances whose mask has no pixel left (e.g. cropped away), keeping every per-instance
    tensor of the target (``labels``, ...: first dimension == N) in step. Works on the whole sample."""

    def __call__(self, *inputs: Any) -> Any:
        sample = inputs if len(inputs) > 1 else inputs[0]
        if not (isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[1], dict)):
            return sample
        image, target = sample
        masks = target.get("masks")
        if masks is None or masks.shape[0] == 0:
            return image, target
        keep = masks.flatten(1).any(1)
        if bool(keep.all()):
            return image, target
        n = masks.shape[0]
        out = dict(target)
        for key, value in target.items():
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == n:
                kept = value[keep]
                out[key] = tv_tensors.wrap(kept, like=value) if isinstance(value, tv_tensors.TVTensor) else kept
        return image, out

    def __repr__(self) -> str:
        return "DropEmptyInstances()"


def build_transforms(cfg: DataConfig, train: bool) -> v2.Compose:
    """The official train policy (``train=True``) or the test-time resize; see the module docstring."""
    to_float = v2.ToDtype(torch.float32, scale=True)  # a plain dtype converts images only
    if not train:
        return v2.Compose([ShortSideResize([cfg.test_short_side], max_size=cfg.test_max_size), to_float])
    multi_scale = ShortSideResize(cfg.train_short_sides, max_size=cfg.train_max_size)
    crop_branch = v2.Compose([
        ShortSideResize(cfg.crop_resize_short_sides, max_size=None),
        RandomSizeCrop(cfg.crop_size[0], cfg.crop_size[1]),
        ShortSideResize(cfg.train_short_sides, max_size=cfg.train_max_size),
    ])
    if cfg.crop_prob <= 0:
        scale_step: Any = multi_scale
    elif cfg.crop_prob >= 1:
        scale_step = crop_branch
    else:
        scale_step = v2.RandomChoice([multi_scale, crop_branch], p=[1.0 - cfg.crop_prob, cfg.crop_prob])
    return v2.Compose([
        v2.RandomHorizontalFlip(p=cfg.flip_prob),
        scale_step,
        DropEmptyInstances(),
        to_float,
    ])
