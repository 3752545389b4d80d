"""Instance label images -> COCO json (``isda convert labels``), and 16-bit images' intensity mapping.

Every label image is generated here with numpy and written with PIL (8-bit PNG, 16-bit TIFF)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from isda.cli import main
from isda.config import get_preset
from isda.data import (CocoInstanceDataset, DatasetError, DataWarning, build_transforms, decode_rle, labelmaps_to_coco,
                       load_rgb)

H, W = 24, 32


def label_a() -> np.ndarray:
    """Two touching instances with non-contiguous ids (3, 700 in a 16-bit TIFF), one in two pieces (41)."""
    lab = np.zeros((H, W), np.uint16)
    lab[2:10, 2:10] = 3
    lab[2:10, 10:18] = 700  # touches 3
    lab[14:20, 2:6] = 41
    lab[14:20, 24:30] = 41  # the same instance, disconnected
    return lab


def label_b() -> np.ndarray:
    lab = np.zeros((H, W), np.uint8)
    lab[5:15, 5:25] = 1
    lab[16:22, 20:28] = 255
    return lab


def write_dataset(root: Path, extra: dict[str, np.ndarray] | None = None) -> tuple[Path, Path]:
    """images/a.png + labels/a.tif (16-bit), images/b.png + labels/b_mask.png (8-bit)."""
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(images / f"{name}.png")
    Image.fromarray(label_a()).save(labels / "a.tif")
    Image.fromarray(label_b()).save(labels / "b_mask.png")
    for name, array in (extra or {}).items():
        Image.fromarray(array).save(labels / name)
    return labels, images


def by_image(coco: dict) -> dict[str, list[dict]]:
    names = {img["id"]: img["file_name"] for img in coco["images"]}
    out: dict[str, list[dict]] = {}
    for a in coco["annotations"]:
        out.setdefault(names[a["image_id"]], []).append(a)
    return out


def test_round_trip_masks_bboxes_areas_exact(tmp_path: Path) -> None:
    labels, images = write_dataset(tmp_path)
    with Image.open(labels / "a.tif") as im:
        assert im.mode == "I;16"  # the 16-bit path is the one under test
    done = labelmaps_to_coco(labels, images, tmp_path / "ann.json")
    coco = json.loads((tmp_path / "ann.json").read_text())
    assert (done.images, done.instances, done.categories) == (2, 5, {1: "object"})
    assert coco["categories"] == [{"id": 1, "name": "object"}]
    assert [(i["file_name"], i["height"], i["width"]) for i in coco["images"]] == [("a.png", H, W), ("b.png", H, W)]
    anns = by_image(coco)
    for file_name, lab in (("a.png", label_a()), ("b.png", label_b())):
        ids = [i for i in np.unique(lab) if i]
        assert len(anns[file_name]) == len(ids)  # the two pieces of 41 are one instance
        for a, i in zip(anns[file_name], ids):
            expected = (lab == i).astype(np.uint8)
            assert isinstance(a["segmentation"]["counts"], str)
            assert np.array_equal(decode_rle(a["segmentation"]), expected)
            ys, xs = np.nonzero(expected)
            assert a["area"] == expected.sum()
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert a["category_id"] == 1 and a["iscrowd"] == 0
    assert len({a["id"] for a in coco["annotations"]}) == 5


def write_class_map(root: Path, name: str, classes: np.ndarray) -> Path:
    folder = root / "classes"
    folder.mkdir(exist_ok=True)
    Image.fromarray(classes).save(folder / name)
    return folder


def test_class_map_majority_and_warnings(tmp_path: Path) -> None:
    labels, images = write_dataset(tmp_path)
    ca = np.zeros((H, W), np.uint8)
    ca[label_a() == 3] = 7
    ca[label_a() == 700] = 2
    ca[2:10, 10:12] = 7  # 25% of instance 700 on class 7: straddles, class 2 kept
    # instance 41 lies on 0: skipped
    cb = np.full((H, W), 5, np.uint8)
    write_class_map(tmp_path, "a.png", ca)
    classes = write_class_map(tmp_path, "b_labels.tif", cb)
    with pytest.warns(DataWarning) as caught:
        done = labelmaps_to_coco(labels, images, tmp_path / "ann.json", class_maps_dir=classes)
    messages = [str(w.message) for w in caught]
    assert any("a.tif: instance 700 straddles classes in a.png: 2 (75%), 7 (25%); class 2 used" in m for m in messages)
    assert any("a.tif: instance 41 lies mostly (100%) on class 0" in m and "skipped" in m for m in messages)
    assert len(messages) == 2
    coco = json.loads((tmp_path / "ann.json").read_text())
    assert [a["category_id"] for a in by_image(coco)["a.png"]] == [7, 2]
    assert [a["category_id"] for a in by_image(coco)["b.png"]] == [5, 5]
    assert coco["categories"] == [{"id": 2, "name": "class_2"}, {"id": 5, "name": "class_5"},
                                  {"id": 7, "name": "class_7"}]  # non-contiguous ids as given
    assert (done.instances, done.skipped_instances) == (4, 1)


def test_categories_file_names_all_ids_and_refuses_unknown(tmp_path: Path) -> None:
    labels, images = write_dataset(tmp_path)
    classes = write_class_map(tmp_path, "a.png", np.full((H, W), 9, np.uint8))
    Image.fromarray(np.full((H, W), 4, np.uint8)).save(classes / "b.png")
    cats = tmp_path / "cats.json"
    cats.write_text(json.dumps({"4": "cell", "9": "nucleus", "12": "unused"}))
    labelmaps_to_coco(labels, images, tmp_path / "ann.json", class_maps_dir=classes, categories=cats)
    coco = json.loads((tmp_path / "ann.json").read_text())
    assert coco["categories"] == [{"id": 4, "name": "cell"}, {"id": 9, "name": "nucleus"}, {"id": 12, "name": "unused"}]
    assert {a["category_id"] for a in coco["annotations"]} == {4, 9}

    cats.write_text(json.dumps({"4": "cell"}))
    with pytest.raises(DatasetError, match=r"a.png: class 9 \(instance 3 of a.tif\) is not in .*cats.json"):
        labelmaps_to_coco(labels, images, tmp_path / "ann2.json", class_maps_dir=classes, categories=cats)
    # one category without class maps: its id and name
    cats.write_text(json.dumps({"3": "nucleus"}))
    labelmaps_to_coco(labels, images, tmp_path / "ann3.json", categories=cats)
    coco = json.loads((tmp_path / "ann3.json").read_text())
    assert coco["categories"] == [{"id": 3, "name": "nucleus"}]
    assert {a["category_id"] for a in coco["annotations"]} == {3}
    for bad, fragment in (({"0": "bg"}, "is < 1"), ({"x": "a"}, "not an integer id"), ([1], "expected a JSON object"),
                          ({"1": ""}, "non-empty string")):
        cats.write_text(json.dumps(bad))
        with pytest.raises(DatasetError, match=fragment):
            labelmaps_to_coco(labels, images, tmp_path / "ann4.json", categories=cats)


def test_cli_end_to_end_then_the_dataset_loads_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    labels, images = write_dataset(tmp_path)
    ann = tmp_path / "out" / "ann.json"
    assert main(["convert", "labels", "--labels", str(labels), "--images", str(images), "--out", str(ann),
                 "--category", "nucleus"]) == 0
    out = capsys.readouterr().out
    assert "2 images, 5 instances, 1 categories (1: nucleus)" in out and str(ann) in out
    assert f"isda train --ann {ann} --images {images}" in out
    assert not list(ann.parent.glob(".*.tmp"))  # written through a temp file, renamed
    ds = CocoInstanceDataset(ann, images, build_transforms(get_preset("isda_tiny").data, False), train=False)
    counts = sorted(len(ds[i][1]["labels"]) for i in range(len(ds)))
    assert counts == [2, 3]


def test_convert_weights_still_takes_src_dst(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``isda convert SRC DST`` is untouched: a missing SRC is its own one-line error, not the labels parser's."""
    assert main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "x.pth"), "--preset", "isda_tiny"]) == 2
    assert capsys.readouterr().err.startswith("isda convert: error: ")


def _float_label(root: Path) -> None:
    Image.fromarray(label_a().astype(np.float32)).save(root / "labels" / "a.tif")


def _rgb_label(root: Path) -> None:
    (root / "labels" / "a.tif").unlink()
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "labels" / "a.png")


def _small_label(root: Path) -> None:
    Image.fromarray(label_a()[:20]).save(root / "labels" / "a.tif")


def _orphan_label(root: Path) -> None:
    Image.fromarray(label_b()).save(root / "labels" / "c.png")


def _broken_label(root: Path) -> None:
    (root / "labels" / "a.tif").write_text("not a tiff")


def _broken_image(root: Path) -> None:
    (root / "images" / "b.png").write_bytes(b"\x89PNG broken")


def _no_labels(root: Path) -> None:
    for f in (root / "labels").iterdir():
        f.unlink()


@pytest.mark.parametrize("damage, fragment", [
    (_float_label, "a.tif: label image of pixel mode F"),
    (_rgb_label, "a.png: label image of pixel mode RGB"),
    (_small_label, "a.tif: label image size 32x20 differs from its image a.png (32x24)"),
    (_orphan_label, "c.png: label image without an image (no c.* in"),
    (_broken_label, "a.tif: cannot read label image"),
    (_broken_image, "b.png: cannot read image"),
    (_no_labels, "no label images (.png, .tif, .tiff)"),
], ids=["float", "rgb", "size", "orphan", "unreadable_label", "unreadable_image", "none"])
def test_bad_input_is_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture, damage, fragment,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ISDA_DEBUG", raising=False)
    labels, images = write_dataset(tmp_path)
    damage(tmp_path)
    ann = tmp_path / "ann.json"
    assert main(["convert", "labels", "--labels", str(labels), "--images", str(images), "--out", str(ann)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("isda convert labels: error: "), lines
    assert fragment in lines[0]
    assert not ann.exists()


def test_image_without_label_warns_and_is_skipped(tmp_path: Path) -> None:
    labels, images = write_dataset(tmp_path)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(images / "c.png")
    with pytest.warns(DataWarning, match=r"1 image\(s\) in .* have no label image in .*; skipped: c.png"):
        done = labelmaps_to_coco(labels, images, tmp_path / "ann.json")
    assert done.images == 2 and done.skipped_images == ["c.png"]


def test_16_bit_images_use_their_own_range(tmp_path: Path) -> None:
    """Dim 16-bit data (0..235) is taken as 8-bit, 12-bit data (0..4095) is stretched: neither comes out black."""
    dim = np.arange(H * W).reshape(H, W) % 236
    Image.fromarray(dim.astype(np.uint16)).save(tmp_path / "dim.tif")
    with Image.open(tmp_path / "dim.tif") as im:
        assert im.mode == "I;16"
    rgb = load_rgb(tmp_path / "dim.tif")
    assert rgb.max() == 235 and np.array_equal(rgb[..., 0], dim) and np.array_equal(rgb[..., 0], rgb[..., 2])

    twelve = (np.arange(H * W).reshape(H, W) * 4095 // (H * W - 1)).astype(np.uint16)
    Image.fromarray(twelve).save(tmp_path / "twelve.png")
    gray = load_rgb(tmp_path / "twelve.png")[..., 0].astype(int)
    lo, hi = np.percentile(twelve, (0.1, 99.9))
    assert gray.max() == 255 and gray.min() == 0
    assert np.all(np.diff(gray.ravel()) >= 0)  # monotonic
    expected = np.clip(np.rint((twelve - lo) * 255 / (hi - lo)), 0, 255)
    assert np.array_equal(gray, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a legitimate 16-bit image
        load_rgb(tmp_path / "twelve.png")


def test_rle_matches_pycocotools_encoding(tmp_path: Path) -> None:
    """The counts string is pycocotools' own (so any COCO tool reads the file)."""
    labels, images = write_dataset(tmp_path)
    labelmaps_to_coco(labels, images, tmp_path / "ann.json")
    first = json.loads((tmp_path / "ann.json").read_text())["annotations"][0]
    expected = mask_utils.encode(np.asfortranarray((label_a() == 3).astype(np.uint8)))
    assert first["segmentation"]["counts"] == expected["counts"].decode()
