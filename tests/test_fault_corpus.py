"""The fault corpus: bad input and faults a user hits, each run through ``isda train / eval / predict / convert
labels`` and
held to its exact behaviour (exit code; the one error line naming the file or field, or the warning; files
that must not change). ``docs/faults.md`` is generated from ``CASES``: ``.venv/bin/python tests/test_fault_corpus.py``.

Every input (images included) is generated here; nothing is downloaded. The commands run in-process
(``isda.cli.main``) except the kill -9 cases, which need a process to kill. Dataset-level details of the same
handling are tested in test_data_coco.py; the trainer's non-finite skips in test_engine.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine_utils import SMALL, single_thread
from isda.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "faults.md"
H, W = 32, 48

# isda_tiny at the size of engine_utils.SMALL, one image per batch: the cheapest real run.
SETS = [arg for key, value in {**SMALL, "batch_size": 1, "epochs": 2}.items()
        for arg in ("--set", f"{key}={','.join(map(str, value)) if isinstance(value, list) else value}")]


# ---------------------------------------------------------------------------------------------------
# Inputs


def rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def picture(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """A textured background with a bright box where the clean annotation says."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
    arr[4:20, 6:30] = 230
    return arr


@dataclass
class Ctx:
    """A case's folder and the shared trained checkpoint; builders write inputs and return the arguments."""

    dir: Path
    weights: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def dataset(self, images: list[dict] | None = None, anns: list[dict] | None = None,
                cats: list[dict] | None = None, raw: str | None = None, write_images: bool = True
                ) -> tuple[Path, Path]:
        """A COCO file (two clean images with one box each unless given) and its image folder."""
        img_dir = self.dir / "images"
        img_dir.mkdir(parents=True, exist_ok=True)
        if images is None:
            images = [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2)]
        if anns is None:
            anns = [{"id": 10 + img["id"], "image_id": img["id"], "category_id": 1,
                     "segmentation": [rect(6, 4, 30, 20)]} for img in images]
        for k, img in enumerate(images):
            if write_images and not (img_dir / img["file_name"]).exists():
                Image.fromarray(picture(k, img["height"], img["width"])).save(img_dir / img["file_name"])
        ann = self.dir / "ann.json"
        ann.write_text(raw if raw is not None else json.dumps(
            {"images": images, "annotations": anns, "categories": cats or [{"id": 1, "name": "box"}]}))
        return ann, img_dir

    def out(self, name: str = "out") -> Path:
        return self.dir / name


def train_args(ann: Path, images: Path, out: Path, *more: str) -> list[str]:
    return ["train", "--preset", "isda_tiny", "--ann", str(ann), "--images", str(images), "--out", str(out),
            "--max-iters", "1", *SETS, *more]


def eval_args(ctx: Ctx, ann: Path, images: Path, weights: Path | None = None) -> list[str]:
    return ["eval", "--weights", str(weights or ctx.weights), "--ann", str(ann), "--images", str(images),
            "--results", str(ctx.out("results.json")), "--device", "cpu"]


def predict_args(ctx: Ctx, *paths: Path, weights: Path | None = None) -> list[str]:
    return ["predict", "--weights", str(weights or ctx.weights), *map(str, paths), "--out", str(ctx.out()),
            "--score-thr", "0.0", "--device", "cpu"]


def one_image(ctx: Ctx, save: Callable[[Path], None], h: int = H, w: int = W, name: str = "x.png") -> list[str]:
    """`isda eval` on a dataset of one image written by ``save`` (with one clean box annotation)."""
    img_dir = ctx.dir / "images"
    img_dir.mkdir(parents=True)
    save(img_dir / name)
    ann, images = ctx.dataset([{"id": 1, "file_name": name, "height": h, "width": w}], write_images=False)
    return eval_args(ctx, ann, images)


def save_exif_rotated(path: Path) -> None:
    """Stored W x H with EXIF orientation 6: viewers (and the json's H x W... here W x H) show it rotated."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(picture(0, W, H)).save(path, quality=95, exif=exif.tobytes())


def save_float_tiff(values: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def save(path: Path) -> None:
        a = picture(0)[..., 0].astype(np.float32) / 255
        Image.fromarray(values(a)).save(path)  # float32: mode F
    return save


def with_inf(a: np.ndarray) -> np.ndarray:
    a[0, 0] = np.inf
    return a


def huge_png_header(path: Path) -> None:
    """A PNG whose header claims 40000 x 40000 px (a decompression bomb) over a few bytes of pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b""))


def evil_checkpoint(ctx: Ctx) -> Path:
    """A checkpoint whose unpickling would run a shell command (creating a marker file)."""
    marker = ctx.dir / "pwned"

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    path = ctx.dir / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "x": Evil()}, path)
    ctx.extra["marker"] = marker
    return path


def truncated_checkpoint(ctx: Ctx) -> Path:
    path = ctx.dir / "truncated.pt"
    data = ctx.weights.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def unwritable_dir(ctx: Ctx) -> Path:
    """A folder nobody may write in: chmod 555, or (root ignores modes) a place even root cannot create."""
    if os.geteuid() == 0:
        return Path("/sys/isda-fault-corpus")
    d = ctx.dir / "readonly"
    d.mkdir()
    d.chmod(0o555)
    return d / "out"


def a_file(ctx: Ctx) -> Path:
    path = ctx.dir / "a_file"
    path.write_text("not a folder")
    return path


# Run in a subprocess that kills itself with SIGKILL: after optimizer step 2 (the checkpoint of step 1 is on disk),
# or in the middle of writing the second checkpoint (that of step 2).
KILLER = """
import os, signal, sys
import torch
from isda.engine import trainer
when = sys.argv.pop(1)
if when == "step":
    step = trainer._Trainer.train_step
    def train_step(self, *a, **k):
        step(self, *a, **k)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    trainer._Trainer.train_step = train_step
else:
    save, calls = torch.save, []
    def torch_save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a checkpoint"); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        save(obj, f, *a, **k)
    torch.save = torch_save
from isda.cli import main
sys.exit(main(sys.argv[1:]))
"""


def killed_run(ctx: Ctx, when: str) -> list[str]:
    """Train until killed (exit -9), then return the arguments that resume the run."""
    ann, images = ctx.dataset()
    args = train_args(ann, images, ctx.out(), "--set", "train.checkpoint_every=1", "--set", "train.epochs=1")
    args.remove("--max-iters")
    args.remove("1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", KILLER, when, *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ctx.extra["iteration_before"] = torch.load(ctx.out() / "last.pt", weights_only=True)["iteration"]
    ctx.extra["temps"] = sorted(ctx.out().glob(".last.pt.*.tmp"))
    return [*args, "--resume"]


def check_resumed(ctx: Ctx, stderr: str) -> None:
    assert ctx.extra["iteration_before"] == 1
    assert not list(ctx.out().glob(".*.tmp")), "a partial write was left behind"
    final = torch.load(ctx.out() / "last.pt", weights_only=True)
    assert final["iteration"] == 2 and all(torch.isfinite(v).all() for v in final["model"].values())
    rows = [json.loads(line) for line in (ctx.out() / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r["type"] == "train"] == [1, 2]  # no step twice, none lost


def check_write_killed(ctx: Ctx, stderr: str) -> None:
    assert len(ctx.extra["temps"]) == 1  # the kill left the partial file ...
    check_resumed(ctx, stderr)  # ... which the resumed run removed


def weights_turn_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    """An optimizer step that makes a weight NaN at step 2 (what an overflowing lr does)."""
    step = torch.optim.AdamW.step
    calls = []

    def nan_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", nan_step)


def not_called(*args: Any, **kwargs: Any) -> None:
    pytest.fail("the work started before the output was checked")


def check_last_finite(ctx: Ctx, stderr: str) -> None:
    state = torch.load(ctx.out() / "last.pt", weights_only=True)
    assert state["iteration"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


def check_predict_ids(ctx: Ctx, stderr: str) -> None:
    """image_id = index among the images listed (skipped files take none)."""
    results = json.loads((ctx.out() / "results.json").read_text())
    assert sorted({r["image_id"] for r in results}) == [0, 1]
    assert (ctx.out() / "a_pred.png").is_file() and (ctx.out() / "b_pred.png").is_file()


def check_not_black(ctx: Ctx, stderr: str) -> None:
    from isda.data import load_rgb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = load_rgb(ctx.dir / "images" / "x.tiff")
    assert arr.max() >= 200  # the bright box still bright: the inf pixel did not set the scale


def check_ids_kept_and_exact_ap(ctx: Ctx, stderr: str) -> None:
    """Results keep the file's ids; ground truth as predictions scores exactly 100 despite ids from 0."""
    from isda.data import CocoInstanceDataset
    from isda.data.rle import to_rle
    from isda.engine.evaluation import evaluate_masks

    results = json.loads(ctx.out("results.json").read_text())
    assert {r["image_id"] for r in results} <= {0, 1} and {r["category_id"] for r in results} <= {0}
    ds = CocoInstanceDataset(*ctx.extra["paths"], train=False)
    gt = []
    for a in ds.coco.dataset["annotations"]:
        rle = to_rle(a["segmentation"], H, W)
        gt.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                   "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    assert evaluate_masks(ds.coco, gt).stats["AP"] == 1.0


def ids_from_zero(ctx: Ctx) -> list[str]:
    images = [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (0, 1)]
    anns = [{"id": i, "image_id": i, "category_id": 0, "segmentation": [rect(6, 4, 30, 20)]} for i in (0, 1)]
    ctx.extra["paths"] = ctx.dataset(images, anns, [{"id": 0, "name": "box"}])
    weights = ctx.dir / "cat0.pt"
    state = torch.load(ctx.weights, weights_only=True)
    torch.save({**state, "cat_ids": [0]}, weights)
    return eval_args(ctx, *ctx.extra["paths"], weights=weights)


def crowd_both_forms(ctx: Ctx) -> list[str]:
    from pycocotools import mask as mask_utils

    m = np.zeros((H, W), np.uint8)
    m[22:30, 2:40] = 1
    compressed = mask_utils.encode(np.asfortranarray(m))
    flat = m.T.reshape(-1)  # column-major runs, starting with a run of zeros
    starts = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], starts, [flat.size]])).tolist()
    images = [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2)]
    anns = [{"id": 11, "image_id": 1, "category_id": 1, "segmentation": [rect(6, 4, 30, 20)]},
            {"id": 12, "image_id": 2, "category_id": 1, "segmentation": [rect(6, 4, 30, 20)]},
            {"id": 13, "image_id": 1, "category_id": 1, "iscrowd": 1,
             "segmentation": {"size": [H, W], "counts": compressed["counts"].decode()}},
            {"id": 14, "image_id": 2, "category_id": 1, "iscrowd": 1,
             "segmentation": {"size": [H, W], "counts": counts}}]
    return train_args(*ctx.dataset(images, anns), ctx.out())


def bad_polygon(seg: list) -> Callable[[Ctx], list[str]]:
    """`isda train` where image 2's annotation has the segmentation ``seg`` (image 1 stays clean)."""
    def build(ctx: Ctx) -> list[str]:
        images = [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2)]
        anns = [{"id": 11, "image_id": 1, "category_id": 1, "segmentation": [rect(6, 4, 30, 20)]},
                {"id": 12, "image_id": 2, "category_id": 1, "segmentation": seg}]
        return train_args(*ctx.dataset(images, anns), ctx.out())
    return build


def image_file(write: Callable[[Path], None]) -> Callable[[Ctx], list[str]]:
    """`isda eval` where image 2's file is replaced by ``write`` (image 1 stays clean)."""
    def build(ctx: Ctx) -> list[str]:
        ann, images = ctx.dataset()
        write(images / "2.png")
        return eval_args(ctx, ann, images)
    return build


def other_class_count(ctx: Ctx) -> Path:
    """An isda checkpoint of a model with 7 classes instead of 1."""
    state = torch.load(ctx.weights, weights_only=True)
    head = state["model"]["head.class_embed.weight"]
    state["model"]["head.class_embed.weight"] = torch.zeros(7, head.shape[1])
    path = ctx.dir / "other.pt"
    torch.save(state, path)
    return path


def text_file(ctx: Ctx, name: str, text: str = "hello") -> Path:
    path = ctx.dir / name
    path.write_text(text)
    return path


def bad_config(ctx: Ctx) -> list[str]:
    ann, images = ctx.dataset()
    config = text_file(ctx, "bad.yaml", "model:\n  mask_stride: 16\n")
    return ["train", "--config", str(config), "--ann", str(ann), "--images", str(images), "--out", str(ctx.out())]


def existing_run(ctx: Ctx) -> list[str]:
    out = ctx.out()
    out.mkdir()
    (out / "last.pt").write_bytes(ctx.weights.read_bytes())
    return train_args(*ctx.dataset(), out)


def label_images(write_second: Callable[[Path], None] | None = None) -> Callable[[Ctx], list[str]]:
    """`isda convert labels` on the two clean images, one box instance each; ``write_second`` replaces image 2's
    label image (given the labels folder), or it has none."""
    def build(ctx: Ctx) -> list[str]:
        _, images = ctx.dataset()
        labels = ctx.dir / "labels"
        labels.mkdir()
        box = np.zeros((H, W), np.uint8)
        box[4:20, 6:30] = 1
        Image.fromarray(box).save(labels / "1.png")
        if write_second is not None:
            write_second(labels)
        return ["convert", "labels", "--labels", str(labels), "--images", str(images),
                "--out", str(ctx.out("labels.json"))]
    return build


def check_one_image_converted(ctx: Ctx, stderr: str) -> None:
    coco = json.loads(ctx.out("labels.json").read_text())
    assert [img["file_name"] for img in coco["images"]] == ["1.png"] and len(coco["annotations"]) == 1


def labelme_file(image_height: int = H, extra_shapes: tuple[dict, ...] = ()) -> Callable[[Ctx], list[str]]:
    """`isda convert labelme` on a folder holding image 1 and its labelme file: one box, then ``extra_shapes``;
    the file records ``image_height`` as the image's height."""
    def build(ctx: Ctx) -> list[str]:
        _, images = ctx.dataset()
        folder = ctx.dir / "labelme"
        folder.mkdir()
        shutil.copy(images / "1.png", folder / "1.png")
        shapes = [{"label": "box", "points": [[6, 4], [30, 20]], "shape_type": "rectangle"}, *extra_shapes]
        (folder / "1.json").write_text(json.dumps({"shapes": shapes, "imagePath": "1.png", "imageHeight": image_height,
                                                   "imageWidth": W}))
        return ["convert", "labelme", str(folder), "--out", str(ctx.out("labelme.json"))]
    return build


def check_one_box_converted(ctx: Ctx, stderr: str) -> None:
    coco = json.loads(ctx.out("labelme.json").read_text())
    assert len(coco["annotations"]) == 1 and coco["annotations"][0]["bbox"] == [6.0, 4.0, 24.0, 16.0]


def junk_folder(ctx: Ctx) -> list[str]:
    folder = ctx.dir / "photos"
    folder.mkdir()
    Image.fromarray(picture(0)).save(folder / "a.png")
    (folder / "a0_notes.txt").write_text("not an image")
    (folder / "a1_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "a2_empty.png").write_bytes(b"")
    (folder / "sub").mkdir()
    Image.fromarray(picture(1)).save(folder / "b.png")
    return predict_args(ctx, folder)


# ---------------------------------------------------------------------------------------------------
# The corpus


@dataclass(frozen=True)
class Case:
    name: str
    command: str  # train | eval | predict | convert labels
    fault: str  # what the user gave (docs)
    build: Callable[[Ctx], list[str]]  # writes the input, returns the command's arguments
    exit: int  # 0: the run went on; 2: one error line
    message: str  # in the error line (exit 2) or in a warning / stderr (exit 0); "" for none
    behaviour: str  # what happens (docs)
    unchanged: tuple[str, ...] = ()  # files (relative to the case folder) that must not change
    check: Callable[[Ctx, str], None] | None = None
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


def polygon_cases() -> list[Case]:
    return [
        Case("degenerate_polygon", "train", "a polygon of 2 points and one of zero area", bad_polygon([[1, 1, 5, 5]]), 0,
             "polygon with < 3 points", "warning naming image and annotation; annotation skipped"),
        Case("nan_polygon", "train", "NaN in a polygon", bad_polygon([[6, 4, math.nan, 4, 30, 20, 6, 20]]), 2,
             "annotation 12 (image '2.png' (id 2)) field 'segmentation[0]' must be a list of numbers (it holds NaN",
             "one line naming file, annotation and field, saying NaN"),
        Case("polygon_outside", "train", "a polygon partly, another wholly outside the image",
             bad_polygon([rect(-10, -10, 20, 20), rect(100, 100, 120, 120)]), 0, "clipped",
             "warning; the part outside is clipped (an annotation wholly outside is skipped)"),
    ]


CASES: list[Case] = [
    # --- images
    Case("missing_image_file", "eval", "an image listed in the json is not in the folder",
         image_file(lambda p: p.unlink()), 0, "not found; image skipped", "warning naming the file; image skipped"),
    Case("truncated_image", "eval", "a truncated PNG", image_file(lambda p: p.write_bytes(p.read_bytes()[:60])), 0,
         "cannot read image", "warning naming the file; evaluated as a black image without instances"),
    Case("zero_byte_image", "eval", "a zero-byte image file", image_file(lambda p: p.write_bytes(b"")), 0,
         "cannot read image", "warning naming the file; black placeholder"),
    Case("not_an_image", "eval", "a text file named .png", image_file(lambda p: p.write_text("hello")), 0,
         "cannot read image", "warning naming the file; black placeholder"),
    Case("grayscale", "eval", "an 8-bit grayscale image",
         lambda c: one_image(c, lambda p: Image.fromarray(picture(0)[..., 0], "L").save(p)), 0, "",
         "read as RGB, no warning"),
    Case("rgba", "eval", "an RGBA image", lambda c: one_image(c, lambda p: Image.fromarray(picture(0)).convert("RGBA").save(p)),
         0, "", "alpha dropped, no warning"),
    Case("16_bit", "eval", "a 16-bit grayscale PNG",
         lambda c: one_image(c, lambda p: Image.fromarray(picture(0)[..., 0].astype(np.uint16) * 257).save(p)), 0, "",
         "its own range: values <= 255 as 8-bit, else the 0.1th-99.9th percentile stretched to 0..255; no warning"),
    Case("exif_rotated", "eval", "a JPEG stored sideways with EXIF orientation 6", lambda c: one_image(
        c, save_exif_rotated, name="x.jpg"), 0, "", "EXIF orientation applied when the json's size is the rotated one"),
    Case("size_mismatch", "eval", "the json's width/height differ from the file's",
         lambda c: one_image(c, lambda p: Image.fromarray(picture(0, 20, 20)).save(p)), 0,
         "does not match the annotation's width x height", "warning naming the file; black placeholder"),
    Case("float_tiff_inf", "eval", "a float TIFF with one inf pixel",
         lambda c: one_image(c, save_float_tiff(with_inf), name="x.tiff"), 0, "1 of 1536 pixels are NaN or inf",
         "warning; the pixel becomes 0, the rest keeps its scale", check=check_not_black),
    Case("float_tiff_all_nan", "eval", "an all-NaN float TIFF",
         lambda c: one_image(c, save_float_tiff(lambda a: a * np.nan), name="x.tiff"), 0,
         "1536 of 1536 pixels are NaN or inf", "warning (no numpy 'All-NaN slice' warning); a black image"),
    # --- annotations
    *polygon_cases(),
    Case("unknown_category", "train", "an annotation with an unknown category_id", lambda c: train_args(*c.dataset(
        anns=[{"id": 1, "image_id": 1, "category_id": 7, "segmentation": [rect(6, 4, 30, 20)]}]), c.out()), 2,
         "has unknown category_id 7", "one line naming file, annotation, field"),
    Case("unknown_image", "train", "an annotation of an image not in 'images'", lambda c: train_args(*c.dataset(
        anns=[{"id": 1, "image_id": 9, "category_id": 1, "segmentation": [rect(6, 4, 30, 20)]}]), c.out()), 2,
         "annotation 1 refers to unknown image_id 9", "one line naming file, annotation, field"),
    Case("duplicate_ids", "train", "two annotations with the same id", lambda c: train_args(*c.dataset(
        anns=[{"id": 5, "image_id": i, "category_id": 1, "segmentation": [rect(6, 4, 30, 20)]} for i in (1, 2)]),
        c.out()), 2, "duplicate annotation id 5", "one line naming file and id"),
    Case("ids_from_zero", "eval", "image, annotation and category ids from 0 (annotation-tool export)", ids_from_zero, 0, "",
         "evaluated exactly (ground truth as predictions: AP 100); results keep the file's ids",
         unchanged=("ann.json",), check=check_ids_kept_and_exact_ap),
    Case("crowd_rle", "train", "crowd regions as compressed and uncompressed RLE", crowd_both_forms, 0, "",
         "ignored regions for training and evaluation, no warning"),
    Case("zero_instance_images", "train", "images without any annotation", lambda c: train_args(*c.dataset(
        [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2, 3)],
        [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [rect(6, 4, 30, 20)]}]), c.out()), 0, "",
         "trained on as background, no warning"),
    Case("malformed_json", "train", "a truncated annotation file", lambda c: train_args(
        *c.dataset(raw='{"images": [{"id": 1,'), c.out()), 2, "ann.json: not valid JSON",
         "one line naming the file, line and column"),
    Case("empty_annotations", "train", "'annotations': []", lambda c: train_args(*c.dataset(anns=[]), c.out()), 2,
         "ann.json: no usable instance in 2 image(s)", "one line naming the file, before training"),
    Case("empty_annotations_eval", "eval", "'annotations': [] given to isda eval",
         lambda c: eval_args(c, *c.dataset(anns=[])), 2, "ann.json: no usable instance",
         "one line naming the file, before evaluating"),
    Case("empty_images", "train", "'images': []", lambda c: train_args(*c.dataset(images=[], anns=[]), c.out()), 2,
         "ann.json: field 'images' is empty", "one line naming the file and field"),
    Case("no_image_exists", "train", "an --images folder holding none of the listed files",
         lambda c: train_args(*c.dataset(write_images=False), c.out()), 2,
         "none of the 2 image files listed in 'images' is in", "one line naming the file and folder"),
    # --- configuration
    Case("lr_inf", "train", "--set train.lr=inf", lambda c: train_args(*c.dataset(), c.out(), "--set", "train.lr=inf"), 2,
         "config field 'train.lr': must be a finite number > 0, got inf", "one line naming the field, before training"),
    Case("lr_nan", "train", "--set train.lr=nan", lambda c: train_args(*c.dataset(), c.out(), "--set", "train.lr=nan"), 2,
         "config field 'train.lr'", "one line naming the field"),
    Case("lr_negative", "train", "--set train.lr=-1", lambda c: train_args(*c.dataset(), c.out(), "--set", "train.lr=-1"), 2,
         "config field 'train.lr'", "one line naming the field"),
    Case("bad_set", "train", "--set with an unknown key", lambda c: train_args(*c.dataset(), c.out(), "--set", "train.nope=1"),
         2, "train.nope", "one line naming the key"),
    Case("bad_set_value", "train", "--set with a value of the wrong type",
         lambda c: train_args(*c.dataset(), c.out(), "--set", "model.num_queries=many"), 2, "model.num_queries",
         "one line naming the field"),
    Case("weights_nonfinite", "train", "the weights become NaN during training (an overflowing step)",
         lambda c: train_args(*c.dataset(), c.out(), "--set", "train.checkpoint_every=1", "--max-iters", "3"), 2,
         "the weights became non-finite", "one line, exit 2; last.pt keeps the last finite weights",
         check=check_last_finite, patch=weights_turn_nan),
    # --- output
    Case("out_unwritable", "train", "an --out folder that cannot be written", lambda c: train_args(
        *c.dataset(), unwritable_dir(c)), 2, "output folder: cannot write in",
         "one line naming the folder, before training"),
    Case("out_under_a_file", "train", "--out below a file", lambda c: train_args(*c.dataset(), a_file(c) / "run"), 2,
         "output folder: cannot write in", "one line naming the folder", unchanged=("a_file",)),
    Case("out_is_a_file", "train", "--out pointing at a file", lambda c: train_args(*c.dataset(), a_file(c)), 2,
         "a_file is a file, not a folder", "one line naming the path", unchanged=("a_file",)),
    Case("eval_results_unwritable", "eval", "isda eval --results in a folder that cannot be written",
         lambda c: [*eval_args(c, *c.dataset())[:-4], "--results", str(unwritable_dir(c) / "r.json"), "--device",
                    "cpu"], 2, "--results: cannot write in", "one line naming the path, before evaluating",
         patch=lambda m: m.setattr("isda.engine.evaluate", not_called)),
    Case("predict_out_unwritable", "predict", "isda predict --out in a folder that cannot be written",
         lambda c: [*predict_args(c, c.dataset()[1])[:-6], "--out", str(unwritable_dir(c))], 2,
         "--out: cannot write in", "one line naming the folder, before predicting"),
    Case("existing_run", "train", "train into a run folder without --resume", existing_run, 2, "already holds a run",
         "one line; last.pt not overwritten", unchanged=("out/last.pt",)),
    # --- predict
    Case("predict_junk", "predict", "a predict folder with text files, a broken JPEG, an empty PNG and a subfolder",
         junk_folder, 0, "skipping", "a warning naming each unreadable image (other files are not listed); "
         "results' image_id = index among the images listed", check=check_predict_ids),
    Case("huge_image", "predict", "a PNG claiming 40000 x 40000 px (decompression bomb)",
         lambda c: predict_args(c, c.dataset()[1] / "1.png", (huge_png_header(c.dir / "huge.png"), c.dir / "huge.png")[1]),
         0, "DecompressionBombError", "warning naming the file; skipped without decoding"),
    Case("predict_all_unreadable", "predict", "isda predict on one corrupt image only",
         lambda c: predict_args(c, text_file(c, "corrupt.png", "\x89PNG not really")), 2,
         "none of the 1 images could be read", "warning naming the file, then one line"),
    Case("predict_no_match", "predict", "a glob that matches nothing",
         lambda c: predict_args(c, c.dir / "nothing*.png"), 2, "no images found", "one line naming the pattern"),
    Case("predict_absent_file", "predict", "an image path that does not exist",
         lambda c: predict_args(c, c.dir / "absent.png"), 2, "no such file or folder:", "one line naming the path"),
    # --- datasets given by name, configuration files
    Case("no_dataset", "train", "--data pointing at a folder without the COCO layout",
         lambda c: ["train", "--data", str(c.dir / "nodata"), "--out", str(c.out())],
         2, "annotation file not found:", "one line naming the expected instances_train.json"),
    Case("bad_config_file", "train", "a --config YAML with an invalid value", bad_config, 2, "config field 'model.mask_stride'", "one line naming the field"),
    # --- checkpoints
    # --- label images (isda convert labels)
    Case("label_size_mismatch", "convert labels", "a label image of another size than its image",
         label_images(lambda d: Image.fromarray(np.ones((20, 20), np.uint8)).save(d / "2.png")), 2,
         "2.png: label image size 20x20 differs from its image 2.png (48x32)", "one line naming the file, before "
         "writing anything"),
    Case("label_float", "convert labels", "a float TIFF as label image",
         label_images(lambda d: Image.fromarray(np.ones((H, W), np.float32)).save(d / "2.tif")), 2,
         "2.tif: label image of pixel mode F", "one line naming the file and its mode"),
    Case("label_missing", "convert labels", "an image without a label image", label_images(), 0,
         "have no label image", "warning naming the image; it is left out of the json",
         check=check_one_image_converted),
    Case("labelme_size_mismatch", "convert labelme", "a labelme file recording another image height than its image's",
         labelme_file(image_height=H + 8), 2, "1.json: imageHeight x imageWidth 40x48 differ from its image 1.png (32x48)",
         "one line naming the file, before writing anything"),
    Case("labelme_ignore", "convert labelme", "an `__ignore__` region beside a box",
         labelme_file(extra_shapes=({"label": "__ignore__", "points": [[1, 1], [4, 1], [4, 4]]},)), 0,
         "left out 1 __ignore__", "warning counting it; the box converted", check=check_one_box_converted),
    Case("missing_checkpoint", "eval", "--weights naming a file that does not exist",
         lambda c: eval_args(c, *c.dataset(), weights=c.dir / "missing.pt"), 2, "checkpoint not found:",
         "one line naming the file"),
    Case("not_a_checkpoint", "predict", "--weights naming a text file",
         lambda c: predict_args(c, c.dataset()[1], weights=text_file(c, "notes.pt")), 2,
         "notes.pt: not a readable checkpoint", "one line naming the file"),
    Case("other_model_checkpoint", "eval", "a checkpoint of another class count",
         lambda c: eval_args(c, *c.dataset(), weights=other_class_count(c)), 2,
         "does not fit this model (different architecture or class count): head.class_embed.weight",
         "one line naming the file and the tensor"),
    Case("malicious_checkpoint", "predict", "a checkpoint whose unpickling runs a shell command",
         lambda c: predict_args(c, c.dataset()[1], weights=evil_checkpoint(c)), 2,
         "refused to unpickle the Python object posix.system",
         "one line; nothing runs; never suggests weights_only=False",
         check=lambda c, _: None if not c.extra["marker"].exists() else pytest.fail("pickled code ran")),
    Case("truncated_checkpoint", "eval", "a checkpoint cut in half", lambda c: eval_args(
        c, *c.dataset(), weights=truncated_checkpoint(c)), 2, "truncated.pt: not a readable checkpoint",
         "one line naming the file"),
    Case("kill_during_training", "train", "kill -9 during training, then --resume", lambda c: killed_run(c, "step"), 0, "",
         "resumes from the last checkpoint and trains each step once", check=check_resumed),
    Case("kill_during_checkpoint_write", "train", "kill -9 while last.pt is being written, then --resume",
         lambda c: killed_run(c, "write"), 0, "removed",
         "the previous last.pt is intact; the resumed run removes the partial temp file",
         check=check_write_killed),
]


# ---------------------------------------------------------------------------------------------------
# Running a case; the docs table


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def weights(module_dir: Path) -> Path:
    """A checkpoint of one training step on the clean two-image dataset (the baseline: it must work)."""
    root = module_dir
    with single_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(train_args(*Ctx(root, root).dataset(), root / "run")) == 0
    return root / "run" / "last.pt"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fault(case: Case, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ISDA_DEBUG", raising=False)  # it turns one-line errors into tracebacks
    if case.patch is not None:
        case.patch(monkeypatch)
    ctx = Ctx(tmp_path, weights)
    args = case.build(ctx)
    assert args[:len(case.command.split())] == case.command.split()
    before = {name: digest(tmp_path / name) for name in case.unchanged}
    capsys.readouterr()
    with single_thread(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(args)
    out, err = capsys.readouterr()
    warned = [str(w.message) for w in caught]
    assert code == case.exit, f"exit {code}; stderr: {err[-3000:]}"
    assert "Traceback" not in err and "weights_only=False" not in err + out
    assert not any("All-NaN" in w for w in warned), warned
    if case.exit:
        lines = [line for line in err.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith(f"isda {case.command}: error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
        assert case.message in errors[0], errors[0]
    elif case.message:
        assert any(case.message in text for text in (out, err, *warned)), (out, err, warned)
    for name, value in before.items():
        assert digest(tmp_path / name) == value, f"{name} was changed"
    if case.check is not None:
        case.check(ctx, err)


def render() -> str:
    """docs/faults.md: the corpus as a table."""
    lines = [
        "# Bad input and faults",
        "",
        "Generated from `tests/test_fault_corpus.py` (`CASES`) by `.venv/bin/python tests/test_fault_corpus.py`;",
        "the test suite runs every case and checks that this file is current.",
        f"{len(CASES)} cases; none ends in a traceback or in a silent success: exit 2 prints exactly one line",
        "`isda <command>: error: ...` naming the file or field, before any work where the run cannot be",
        "meaningful; exit 0 means the run went on, with a warning naming the file wherever something was",
        "skipped or changed.",
        "",
        "| # | case | command | input | exit | message (fragment) | behaviour |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, c in enumerate(CASES, 1):
        message = f"`{c.message}`" if c.message else "none"
        cells = [str(i), c.name, f"`isda {c.command}`", c.fault, str(c.exit), message.replace("|", "\\|"),
                 c.behaviour]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def test_docs_table_is_current() -> None:
    assert DOC.is_file() and DOC.read_text() == render(), "regenerate: .venv/bin/python tests/test_fault_corpus.py"


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC} ({len(CASES)} cases)")
