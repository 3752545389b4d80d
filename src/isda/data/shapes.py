"""The built-in synthetic instance-segmentation dataset ("shapes"), written in real COCO format.

Five classes (:data:`CLASSES`): circle, square, triangle, star, ring, drawn in varied colours, sizes,
rotations and textures (solid, stripes, noise) on textured backgrounds (two-colour gradient +
low-frequency blotches + pixel noise). Later shapes occlude earlier ones and the masks are kept
consistent: every pixel belongs to at most one instance (the visible one), so the image is exactly
"background, then each instance's fill on its visible mask". A placement that would leave an earlier
instance less than ``min_visible_frac`` visible (or fewer than ``min_visible_px`` pixels) is rejected
and retried, so no unlabelled shape fragments exist. Some images hold groups of near-identical
instances (same class, colour, texture, size and rotation at different, non-touching positions): only
their position tells them apart.

Layout written by :func:`generate_split` (the COCO 2017 layout, so :func:`isda.data.coco_split_paths`
works on it)::

    out_dir/<split>/000000.png ...
    out_dir/annotations/instances_<split>.json

Annotations are **compressed RLE** (``pycocotools.mask.encode``; ``counts`` stored as a UTF-8 string),
which is exact: decoding gives back the generator's masks bit for bit. ``area`` is the pixel count,
``bbox`` is ``pycocotools.mask.toBbox``, ``iscrowd`` is 0; category ids are 1..5 in :data:`CLASSES`
order; image ids are 1..N. Generation is deterministic: image ``i`` of a split depends only on
``(seed, split, i)`` and the knobs, never on other images or on ``num_images``. The generator's
parameters are stored in the json's ``info["isda_shapes"]``, which :func:`make_shapes_dataset` uses to
decide whether an existing copy is complete and current. Every file is written atomically (temp file
+ ``os.replace``) and the json last, so an interrupted run leaves no json and is regenerated;
:func:`make_shapes_dataset` holds a file lock (``root/.shapes.lock``) so concurrent processes (DDP
ranks) generate once and the others wait and reuse it.

One file of about 400 lines: the generator and the writer share the knobs and the format version that
decide whether a copy on disk is current.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from isda.fileio import atomic_write_bytes

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")

FORMAT_VERSION = 1
_IMAGE_NAME = re.compile(r"\d{6}\.png")

# Default difficulty knobs (all can be passed to generate_image / generate_split / make_shapes_dataset).
DEFAULT_KNOBS: dict[str, Any] = {
    "min_instances": 2,
    "max_instances": 6,
    "min_radius_frac": 0.08,  # shape circumradius as a fraction of the image's short side
    "max_radius_frac": 0.22,
    "duplicate_prob": 0.35,  # chance an image holds a group of near-identical instances
    "texture_prob": 0.5,  # chance a shape is striped or noisy instead of (nearly) solid
    "background_noise": 8.0,  # std of per-pixel background noise (0..255 scale)
    "min_visible_frac": 0.3,  # an instance must keep this fraction of its pixels visible
    "min_visible_px": 20,  # ... and at least this many pixels
    "min_contrast": 70.0,  # L1 distance (0..765) between a shape's colour and the background under it
    "max_tries": 20,  # placement attempts per shape before giving up on it
}


def _knobs(overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = set(overrides) - set(DEFAULT_KNOBS)
    if unknown:
        raise TypeError(f"unknown shapes generator option(s): {', '.join(sorted(unknown))} "
                        f"(known: {', '.join(DEFAULT_KNOBS)})")
    knobs = {**DEFAULT_KNOBS, **overrides}
    if not 1 <= knobs["min_instances"] <= knobs["max_instances"]:
        raise ValueError("shapes: need 1 <= min_instances <= max_instances")
    if not 0 < knobs["min_radius_frac"] <= knobs["max_radius_frac"]:
        raise ValueError("shapes: need 0 < min_radius_frac <= max_radius_frac")
    return knobs


def _hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        h = w = image_size
    else:
        h, w = (int(v) for v in image_size)
    if h < 16 or w < 16:
        raise ValueError(f"shapes: image_size must be at least 16 pixels, got {image_size!r}")
    return h, w


# ----------------------------------------------------------------------------------------------------
# Rasterization


def _polygon(n: int, cx: float, cy: float, r: float, angle: float, inner: float | None = None):
    """Vertices of a regular n-gon (or an n-pointed star when ``inner`` is the inner radius ratio)."""
    pts = []
    k = 2 * n if inner is not None else n
    for i in range(k):
        rad = r if (inner is None or i % 2 == 0) else r * inner
        a = angle + 2 * math.pi * i / k
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _shape_mask(label: int, cx: float, cy: float, r: float, angle: float, extra: float,
                h: int, w: int) -> np.ndarray:
    """Binary mask (bool [h, w]) of one shape; ``extra`` is the shape-specific ratio (star/ring)."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    name = CLASSES[label]
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif name == "square":
        draw.polygon(_polygon(4, cx, cy, r, angle), fill=1)
    elif name == "triangle":
        draw.polygon(_polygon(3, cx, cy, r, angle), fill=1)
    elif name == "star":
        draw.polygon(_polygon(5, cx, cy, r, angle, inner=extra), fill=1)
    elif name == "ring":
        ri = r * extra
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    else:  # pragma: no cover - CLASSES and this function change together
        raise AssertionError(name)
    return np.asarray(canvas, dtype=np.uint8).astype(bool)


@dataclass
class _Style:
    colour: np.ndarray  # float32 [3], 0..255
    texture: str  # solid | stripes | noise
    second: np.ndarray  # stripe colour
    period: float
    stripe_angle: float
    noise: float


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    # Saturated-ish colours from HSV; value kept away from the extremes.
    hue = rng.uniform(0, 6)
    sat = rng.uniform(0.35, 1.0)
    val = rng.uniform(0.35, 1.0)
    c = val * sat
    x = c * (1 - abs(hue % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(hue) % 6]
    return (np.array(rgb) + (val - c)).astype(np.float32) * 255


def _random_style(rng: np.random.Generator, texture_prob: float) -> _Style:
    colour = _random_colour(rng)
    texture = "solid"
    if rng.random() < texture_prob:
        texture = "stripes" if rng.random() < 0.5 else "noise"
    second = np.clip(colour * rng.uniform(0.4, 0.7) + rng.uniform(-30, 30, 3), 0, 255).astype(np.float32)
    return _Style(colour=colour, texture=texture, second=second, period=float(rng.uniform(3, 9)),
                  stripe_angle=float(rng.uniform(0, math.pi)), noise=float(rng.uniform(15, 35)))


def _fill(style: _Style, rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The shape's colours (float32 [n, 3]) at the pixels ``(ys, xs)``."""
    n = len(ys)
    img = np.broadcast_to(style.colour, (n, 3)).astype(np.float32)
    if style.texture == "stripes":
        phase = (xs * math.cos(style.stripe_angle) + ys * math.sin(style.stripe_angle)) / style.period
        stripe = (np.floor(phase) % 2 == 1)[:, None]
        img = np.where(stripe, style.second, img)
    sigma = style.noise if style.texture == "noise" else 3.0
    return img + rng.standard_normal((n, 3), dtype=np.float32) * np.float32(sigma)


def _background(rng: np.random.Generator, h: int, w: int, noise: float,
                yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    c0, c1 = _random_colour(rng) * 0.8, _random_colour(rng) * 0.8
    a = rng.uniform(0, 2 * math.pi)
    t = xx * math.cos(a) + yy * math.sin(a)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = (c0 + (c1 - c0) * t[..., None]).astype(np.float32)
    # Low-frequency blotches: a coarse random grid upsampled smoothly.
    g = rng.uniform(-25, 25, (4, 4, 3)).astype(np.float32)
    blotch = np.stack([np.asarray(Image.fromarray(g[..., i], mode="F").resize((w, h), Image.BICUBIC))
                       for i in range(3)], axis=-1)
    img += blotch
    img += rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(noise)
    return img


def generate_image(rng: np.random.Generator, image_size: int | tuple[int, int] = 128,
                   **knobs: Any) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Draw one image.

    Returns ``(image, instances)``: image uint8 [H, W, 3] RGB; instances a list (in drawing order) of
    ``(label, mask)`` with label an index into :data:`CLASSES` and mask bool [H, W], the instance's
    visible pixels. Masks are pairwise disjoint and each has >= ``min_visible_px`` pixels.
    """
    k = _knobs(knobs)
    h, w = _hw(image_size)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    background = _background(rng, h, w, k["background_noise"], yy, xx)
    short = min(h, w)

    n_target = int(rng.integers(k["min_instances"], k["max_instances"] + 1))
    # Plan the instances: optionally one group of 2-3 near-identical copies, then singles.
    plan: list[tuple[int, _Style, float, float, float, bool]] = []  # label, style, r, angle, extra, dup
    if n_target >= 2 and rng.random() < k["duplicate_prob"]:
        label = int(rng.integers(len(CLASSES)))
        style = _random_style(rng, k["texture_prob"])
        r = float(rng.uniform(k["min_radius_frac"], k["max_radius_frac"] * 0.8)) * short
        angle, extra = float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0.4, 0.6))
        for _ in range(min(n_target, int(rng.integers(2, 4)))):
            plan.append((label, style, r * float(rng.uniform(0.95, 1.05)), angle, extra, True))
    while len(plan) < n_target:
        label = int(rng.integers(len(CLASSES)))
        r = float(rng.uniform(k["min_radius_frac"], k["max_radius_frac"])) * short
        plan.append((label, _random_style(rng, k["texture_prob"]), r, float(rng.uniform(0, 2 * math.pi)),
                     float(rng.uniform(0.4, 0.6)), False))
    order = rng.permutation(len(plan))

    # Place each shape; later shapes occlude earlier ones.
    placed: list[dict[str, Any]] = []
    for idx in order:
        label, style, r, angle, extra, _ = plan[idx]
        for _ in range(k["max_tries"]):
            cx = float(rng.uniform(0.1 * w, 0.9 * w))
            cy = float(rng.uniform(0.1 * h, 0.9 * h))
            full = _shape_mask(label, cx, cy, r, angle, extra, h, w)
            area = int(full.sum())
            if area < k["min_visible_px"]:
                continue
            # Keep the shape visible against the background under it.
            if float(np.abs(background[full].mean(0) - style.colour).sum()) < k["min_contrast"]:
                continue
            ok = True
            for p in placed:
                # Look-alikes (same style object, or close colours) must not touch: their common
                # boundary would be invisible.
                similar = p["style"] is style or float(np.abs(p["style"].colour - style.colour).sum()) < 90
                if similar and math.hypot(p["cx"] - cx, p["cy"] - cy) < p["r"] + r + 3:
                    ok = False
                    break
                left = int((p["visible"] & ~full).sum())
                if left < max(k["min_visible_px"], k["min_visible_frac"] * p["area"]):
                    ok = False
                    break
            if not ok:
                continue
            for p in placed:
                p["visible"] &= ~full
            placed.append(dict(label=label, style=style, r=r, cx=cx, cy=cy, area=area, visible=full))
            break

    # Safety net (placement already guarantees it): drop almost fully occluded instances; their
    # remaining pixels show background because the image is composed from the final masks.
    kept = [p for p in placed
            if p["visible"].sum() >= max(k["min_visible_px"], k["min_visible_frac"] * p["area"])]
    image = background
    for p in kept:
        ys, xs = np.nonzero(p["visible"])
        image[ys, xs] = _fill(p["style"], rng, ys.astype(np.float32), xs.astype(np.float32))
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, [(p["label"], p["visible"]) for p in kept]


# ----------------------------------------------------------------------------------------------------
# Files


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator that draws image ``index`` of ``split`` (``generate_image(image_rng(...), ...)``
    reproduces that image and its masks exactly)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(split.encode()), int(index)]))


def _params(split: str, num_images: int, image_size: int | tuple[int, int], seed: int,
            knobs: dict[str, Any]) -> dict[str, Any]:
    h, w = _hw(image_size)
    return {"format_version": FORMAT_VERSION, "split": split, "num_images": int(num_images),
            "image_size": [h, w], "seed": int(seed), "knobs": knobs}


def generate_split(out_dir: str | os.PathLike, split: str, num_images: int,
                   image_size: int | tuple[int, int] = 128, seed: int = 0, **knobs: Any) -> Path:
    """Write ``out_dir/<split>/*.png`` and ``out_dir/annotations/instances_<split>.json``.

    Returns the json path. Any existing json of the split is removed first and the new one written
    last (atomically), so an interrupted run never leaves a json that looks complete.
    """
    if num_images < 0:
        raise ValueError("shapes: num_images must be >= 0")
    k = _knobs(knobs)
    h, w = _hw(image_size)
    out_dir = Path(out_dir)
    image_dir = out_dir / split
    ann_file = out_dir / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.unlink(missing_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)

    images, annotations = [], []
    for i in range(num_images):
        image, instances = generate_image(image_rng(seed, split, i), (h, w), **k)
        file_name = f"{i:06d}.png"
        buf = io.BytesIO()
        # Level 0: noisy images barely compress (~25%) and encoding/decoding is ~2x faster.
        Image.fromarray(image).save(buf, format="PNG", compress_level=0)
        atomic_write_bytes(image_dir / file_name, buf.getvalue())
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for label, mask in instances:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": label + 1,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                "area": int(mask.sum()),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            })
    data = {
        "info": {"description": "isda synthetic shapes dataset",
                 "isda_shapes": _params(split, num_images, (h, w), seed, k)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)],
    }
    # Stale images of an earlier, larger split (only our own file names are touched).
    for path in image_dir.iterdir():
        if _IMAGE_NAME.fullmatch(path.name) and int(path.name[:-4]) >= num_images:
            path.unlink(missing_ok=True)
    atomic_write_bytes(ann_file, json.dumps(data, separators=(",", ":")).encode())
    return ann_file


def _complete(out_dir: Path, split: str, expected: dict[str, Any]) -> bool:
    ann_file = out_dir / "annotations" / f"instances_{split}.json"
    try:
        data = json.loads(ann_file.read_text())
        if data["info"]["isda_shapes"] != expected:
            return False
        present = set(os.listdir(out_dir / split))
        return all(img["file_name"] in present for img in data["images"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def _locked(root: Path):
    """Exclusive lock on ``root/.shapes.lock`` so concurrent processes (e.g. DDP ranks) generate once."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".shapes.lock", "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def make_shapes_dataset(root: str | os.PathLike, num_train: int = 2000, num_val: int = 200,
                        image_size: int | tuple[int, int] = 128, seed: int = 0,
                        **knobs: Any) -> dict[str, tuple[Path, Path]]:
    """Write the train and val splits under ``root`` unless an identical, complete copy is there.

    Returns ``{"train": (ann_file, image_dir), "val": (ann_file, image_dir)}``.
    """
    root = Path(root)
    k = _knobs(knobs)
    out: dict[str, tuple[Path, Path]] = {}
    with _locked(root):
        for split, n in (("train", num_train), ("val", num_val)):
            if not _complete(root, split, _params(split, n, image_size, seed, k)):
                generate_split(root, split, n, image_size=image_size, seed=seed, **k)
            out[split] = (root / "annotations" / f"instances_{split}.json", root / split)
    return out
