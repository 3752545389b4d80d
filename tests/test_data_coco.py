"""CocoInstanceDataset on tiny hand-written COCO files: every annotation format, the label mapping,
and each bad-annotation / bad-image case (warned and handled, or refused with DatasetError)."""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from isda.data import (
    CocoInstanceDataset,
    DatasetError,
    DatasetNotFoundError,
    DataWarning,
    coco_split_paths,
    collate,
)

H, W = 12, 16


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------
# helpers


def rect(x0, y0, x1, y1):
    """Polygon of an axis-aligned rectangle; pycocotools fills pixels [y0, y1) x [x0, x1)."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def rect_mask(x0, y0, x1, y1, h=H, w=W):
    m = np.zeros((h, w), dtype=bool)
    m[max(y0, 0):y1, max(x0, 0):x1] = True
    return m


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with a run of zeros (written independently of pycocotools)."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode()}


def save_image(path: Path, h=H, w=W, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return arr


def write_coco(tmp_path: Path, images, annotations, categories=None, name="ann.json", raw=None):
    img_dir = tmp_path / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for img in images:
        p = img_dir / img["file_name"]
        if not p.exists() and not img.pop("_missing", False):
            save_image(p, img["height"], img["width"], seed=img["id"])
        img.pop("_missing", None)
    data = {"images": images, "annotations": annotations,
            "categories": categories if categories is not None else [{"id": 1, "name": "thing"}]}
    path = tmp_path / name
    path.write_text(raw if raw is not None else json.dumps(data))
    return path, img_dir


def image(i, name=None, h=H, w=W, **extra):
    return {"id": i, "file_name": name or f"img{i}.png", "height": h, "width": w, **extra}


def ann(i, image_id, seg, category_id=1, **extra):
    return {"id": i, "image_id": image_id, "category_id": category_id, "segmentation": seg, **extra}


def build(tmp_path, images, annotations, categories=None, **kw):
    return CocoInstanceDataset(*write_coco(tmp_path, images, annotations, categories), **kw)


def assert_warned(record, *patterns):
    messages = [str(r.message) for r in record if issubclass(r.category, DataWarning)]
    for pattern in patterns:
        assert any(re.search(pattern, m) for m in messages), f"no warning matching {pattern!r} in {messages}"


@contextlib.contextmanager
def quiet():
    """Context in which any DataWarning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        yield


# ----------------------------------------------------------------------------------------------------
# clean data: formats, label mapping, crowd, empty images


def test_formats_labels_crowd_and_empty_image(tmp_path):
    m_unc = rect_mask(1, 6, 5, 11)
    m_cmp = np.zeros((H, W), bool)
    m_cmp[2:9, 9:15] = True
    m_cmp[4:6, 11:13] = False  # a hole: only RLE can hold it exactly
    cats = [{"id": 42, "name": "zebra"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]  # unsorted, gaps
    images = [image(10, "a.png"), image(20, "b.png"), image(5, "empty.png")]
    anns = [
        ann(100, 10, [rect(2, 1, 6, 4)], category_id=42, area=12.0, bbox=[2, 1, 4, 3], iscrowd=0),
        ann(101, 10, uncompressed_rle(m_unc), category_id=3),  # no area/bbox/iscrowd: filled in
        ann(102, 10, compressed_rle(m_cmp), category_id=7, iscrowd=0),
        ann(103, 10, uncompressed_rle(rect_mask(0, 0, 16, 2)), category_id=3, iscrowd=1),  # crowd
        ann(104, 20, [rect(0, 0, 3, 3), rect(10, 8, 13, 12)], category_id=42),  # two-part polygon
    ]
    with quiet():  # a clean file: no warning at all
        ds = build(tmp_path, images, anns, cats)
        samples = [ds[i] for i in range(len(ds))]
    assert ds.cat_ids == [3, 7, 42] and ds.class_names == ["cat", "dog", "zebra"] and ds.num_classes == 3
    assert [ds.label_to_cat_id(i) for i in range(3)] == ds.cat_ids
    assert ds.cat_id_to_label == {3: 0, 7: 1, 42: 2}
    assert ds.ids == [5, 10, 20] and len(ds) == 3 and not ds.skipped

    img5, t5 = samples[0]  # the image without annotations is kept
    assert t5["image_id"] == 5 and t5["labels"].shape == (0,) and t5["masks"].shape == (0, H, W)
    assert img5.shape == (3, H, W) and img5.dtype == torch.float32 and 0 <= img5.min() and img5.max() <= 1

    _, t10 = samples[1]
    assert t10["image_id"] == 10 and t10["orig_size"] == (H, W)
    assert t10["labels"].dtype == torch.int64 and t10["labels"].tolist() == [2, 0, 1]  # crowd excluded
    expected = np.stack([rect_mask(2, 1, 6, 4), m_unc, m_cmp])
    assert t10["masks"].dtype == torch.bool and torch.equal(t10["masks"], torch.from_numpy(expected))
    # label -> category id -> back
    assert [ds.cat_id_to_label[ds.label_to_cat_id(lb)] for lb in t10["labels"].tolist()] == [2, 0, 1]

    _, t20 = samples[2]
    assert t20["labels"].tolist() == [2]
    assert torch.equal(t20["masks"][0], torch.from_numpy(rect_mask(0, 0, 3, 3) | rect_mask(10, 8, 13, 12)))

    # Crowd kept for evaluation; missing fields filled so COCOeval works.
    assert ds.coco.anns[103]["iscrowd"] == 1
    assert ds.coco.anns[101]["area"] == m_unc.sum() and ds.coco.anns[101]["iscrowd"] == 0
    assert ds.coco.anns[101]["bbox"] == [1.0, 6.0, 4.0, 5.0]
    assert sorted(ds.coco.getImgIds()) == [5, 10, 20]

    images_b, targets_b = collate(samples)
    assert len(images_b) == 3 and targets_b[1] is samples[1][1]


def test_coco_split_paths(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    with pytest.raises(DatasetNotFoundError, match="val2017"):
        coco_split_paths(tmp_path, "val2017")  # image folder missing
    (tmp_path / "val2017").mkdir()
    assert coco_split_paths(tmp_path, "val2017") == (
        tmp_path / "annotations" / "instances_val2017.json", tmp_path / "val2017")
    with pytest.raises(DatasetNotFoundError, match="instances_train2017.json"):
        coco_split_paths(tmp_path, "train2017")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError (and a DatasetError)
        CocoInstanceDataset(tmp_path / "nope.json", tmp_path)


# ----------------------------------------------------------------------------------------------------
# annotation problems handled with a warning


def test_polygon_with_fewer_than_3_points_is_skipped(tmp_path):
    anns = [ann(7, 1, [[1, 1, 5, 5]]), ann(8, 1, [rect(1, 1, 4, 4)]),
            ann(9, 1, [rect(8, 2, 12, 6), [3, 3]])]  # one bad part of a valid annotation
    with pytest.warns(DataWarning) as rec:
        ds = build(tmp_path, [image(1)], anns)
    assert_warned(rec, r"'img1.png' \(id 1\), annotation 7: polygon with < 3 points",
                  r"'img1.png' \(id 1\), annotation 9: 1 of 2 polygons")
    assert ds.skipped["polygon_too_few_points"] == 1 and ds.fixed["polygon_part_dropped"] == 1
    assert 7 not in ds.coco.anns and ds.coco.anns[9]["segmentation"] == [rect(8, 2, 12, 6)]
    _, t = ds[0]
    assert t["masks"].shape[0] == 2
    assert torch.equal(t["masks"][1], torch.from_numpy(rect_mask(8, 2, 12, 6)))


def test_zero_area_masks_are_skipped(tmp_path):
    anns = [
        ann(11, 1, [[1, 1, 2, 2, 3, 3]]),  # collinear polygon
        ann(12, 1, uncompressed_rle(np.zeros((H, W), bool))),  # empty RLE
        ann(13, 1, [rect(1, 1, 5, 5)], area=0),  # declared area 0
        ann(14, 1, [[0.1, 0.1, 0.3, 0.1, 0.2, 0.3]], area=0.02),  # rasterizes to no pixel: found at load
        ann(15, 1, [rect(6, 6, 9, 9)]),
    ]
    with pytest.warns(DataWarning) as rec:
        ds = build(tmp_path, [image(1)], anns)
    assert_warned(rec, r"'img1.png' \(id 1\), annotation 11: polygon.*zero area",
                  r"'img1.png' \(id 1\), annotation 12: RLE mask is empty",
                  r"'img1.png' \(id 1\), annotation 13: declared area 0")
    assert ds.skipped["zero_area"] == 3
    with pytest.warns(DataWarning, match=r"'img1.png' \(id 1\), annotation 14: mask has no pixels"):
        _, t = ds[0]
    assert t["labels"].tolist() == [0] and ds.skipped["zero_area"] == 4
    with quiet():
        ds[0]  # counted and warned once, not every epoch
    assert ds.skipped["zero_area"] == 4
    assert torch.equal(t["masks"][0], torch.from_numpy(rect_mask(6, 6, 9, 9)))


def test_polygon_and_box_partly_outside_are_clipped(tmp_path):
    anns = [ann(21, 1, [rect(-4, -3, 5, 4)], bbox=[-4, -3, 9, 7]),
            ann(22, 1, [rect(12, 8, 20, 15)], bbox=[12.0, 8.0, 8.0, 7.0]),
            ann(23, 1, [rect(30, 30, 40, 40)])]  # entirely outside
    with pytest.warns(DataWarning) as rec:
        ds = build(tmp_path, [image(1)], anns)
    assert_warned(rec, r"'img1.png' \(id 1\), annotation 21: polygon extends outside",
                  r"'img1.png' \(id 1\), annotation 21: bbox .* clipped",
                  r"'img1.png' \(id 1\), annotation 22: bbox .* clipped",
                  r"'img1.png' \(id 1\), annotation 23: polygon lies entirely outside")
    assert ds.coco.anns[21]["bbox"] == [0.0, 0.0, 5.0, 4.0]
    assert ds.coco.anns[22]["bbox"] == [12.0, 8.0, 4.0, 4.0]
    assert ds.fixed["polygon_clipped"] == 2 and ds.fixed["bbox_clipped"] == 2 and ds.skipped["outside_image"] == 1
    _, t = ds[0]
    expected = np.stack([rect_mask(0, 0, 5, 4), rect_mask(12, 8, 16, 12)])
    assert torch.equal(t["masks"], torch.from_numpy(expected))


def test_bad_rle_is_skipped(tmp_path):
    wrong_size = {"size": [H + 1, W], "counts": [0, (H + 1) * W]}
    wrong_sum = {"size": [H, W], "counts": [5, 10, 3]}
    with pytest.warns(DataWarning) as rec:
        ds = build(tmp_path, [image(1)], [ann(31, 1, wrong_size), ann(32, 1, wrong_sum)])
    assert_warned(rec, r"'img1.png' \(id 1\), annotation 31: RLE size",
                  r"'img1.png' \(id 1\), annotation 32: uncompressed RLE counts sum")
    assert ds.skipped == {"rle_size_mismatch": 1, "invalid_rle": 1}


def test_one_summary_warning(tmp_path):
    with pytest.warns(DataWarning) as record:
        build(tmp_path, [image(1), image(2, _missing=True)], [ann(1, 1, [[1, 1, 2, 2]])])
    summaries = [str(r.message) for r in record if "images kept" in str(r.message)]
    assert len(summaries) == 1
    assert "missing_image_file=1" in summaries[0] and "polygon_too_few_points=1" in summaries[0]


# ----------------------------------------------------------------------------------------------------
# refused with DatasetError


def test_unknown_category_is_refused(tmp_path):
    with pytest.raises(DatasetError, match=r"annotation 55 .*unknown category_id 99"):
        build(tmp_path, [image(1)], [ann(55, 1, [rect(1, 1, 4, 4)], category_id=99)])


def test_unknown_image_id_is_refused(tmp_path):
    with pytest.raises(DatasetError, match=r"annotation 56 refers to unknown image_id 77"):
        build(tmp_path, [image(1)], [ann(56, 77, [rect(1, 1, 4, 4)])])


def test_malformed_json_is_refused(tmp_path):
    path, img_dir = write_coco(tmp_path, [image(1)], [], raw='{"images": [}')
    with pytest.raises(DatasetError, match=r"ann\.json: not valid JSON .*line 1"):
        CocoInstanceDataset(path, img_dir)


@pytest.mark.parametrize("drop, match", [
    (("top", "annotations"), r"ann\.json: missing the required top-level field 'annotations'"),
    (("image", "file_name"), r"ann\.json: images\[0\] is missing the required field 'file_name'"),
    (("image", "height"), r"ann\.json: images\[0\] is missing the required field 'height'"),
    (("ann", "segmentation"), r"ann\.json: annotations\[0\] is missing the required field 'segmentation'"),
    (("ann", "category_id"), r"annotations\[0\] is missing the required field 'category_id'"),
    (("cat", "name"), r"categories\[0\] is missing the required field 'name'"),
])
def test_missing_keys_are_refused(tmp_path, drop, match):
    img, a, cat = image(1), ann(1, 1, [rect(1, 1, 4, 4)]), {"id": 1, "name": "thing"}
    data = {"images": [img], "annotations": [a], "categories": [cat]}
    where, key = drop
    {"top": data, "image": img, "ann": a, "cat": cat}[where].pop(key)
    (tmp_path / "images").mkdir()
    save_image(tmp_path / "images" / "img1.png")
    (tmp_path / "ann.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=match):
        CocoInstanceDataset(tmp_path / "ann.json", tmp_path / "images")


def test_malformed_values_and_duplicates_are_refused(tmp_path):
    with pytest.raises(DatasetError, match=r"annotation 1 .*'segmentation\[0\]' has an odd number"):
        build(tmp_path, [image(1)], [ann(1, 1, [[1, 1, 4, 1, 4]])])
    with pytest.raises(DatasetError, match=r"duplicate annotation id 1"):
        build(tmp_path, [image(1)], [ann(1, 1, [rect(1, 1, 4, 4)]), ann(1, 1, [rect(1, 1, 4, 4)])])
    with pytest.raises(DatasetError, match=r"duplicate image id 1"):
        build(tmp_path, [image(1), image(1, "other.png")], [])
    with pytest.raises(DatasetError, match=r"image 'img1.png' \(id 1\) field 'width'"):
        build(tmp_path, [image(1, w=0)], [])


# ----------------------------------------------------------------------------------------------------
# image files


def test_missing_image_file_is_skipped_at_construction(tmp_path):
    images = [image(1), image(2, "gone.png", _missing=True)]
    with pytest.warns(DataWarning) as rec:
        ds = build(tmp_path, images, [ann(1, 1, [rect(1, 1, 4, 4)]), ann(2, 2, [rect(1, 1, 4, 4)])])
    assert_warned(rec, r"'gone.png' \(id 2\).*not found; image skipped")
    assert ds.ids == [1] and ds.skipped["missing_image_file"] == 1
    assert 2 not in ds.coco.imgs and 2 not in ds.coco.anns


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_corrupt_image_is_substituted_in_training(tmp_path, content):
    path, img_dir = write_coco(tmp_path, [image(1, "bad.png"), image(2)], [ann(1, 2, [rect(1, 1, 4, 4)])])
    good = (img_dir / "img2.png").read_bytes()
    (img_dir / "bad.png").write_bytes(good[: len(good) // 2] if content == "truncated" else content)
    ds = CocoInstanceDataset(path, img_dir)
    with pytest.warns(DataWarning, match=r"'bad.png' \(id 1\).*substituting"):
        img, t = ds[0]
    assert t["image_id"] == 2 and t["labels"].tolist() == [0] and img.shape == (3, H, W)
    assert ds.skipped["unreadable_image"] == 1
    with quiet():
        _, t = ds[0]  # remembered: substituted without decoding again
    assert t["image_id"] == 2 and ds.skipped["unreadable_image"] == 1

    ev = CocoInstanceDataset(path, img_dir, train=False)
    with pytest.warns(DataWarning, match=r"'bad.png' \(id 1\).*black placeholder"):
        img, t = ev[0]
    assert t["image_id"] == 1 and t["masks"].shape == (0, H, W) and img.abs().sum() == 0


def test_all_images_corrupt_raises_one_line_error(tmp_path):
    path, img_dir = write_coco(tmp_path, [image(1, "bad.png")], [])
    (img_dir / "bad.png").write_bytes(b"garbage")
    ds = CocoInstanceDataset(path, img_dir)
    with pytest.warns(DataWarning), pytest.raises(DatasetError, match="no readable image"):
        ds[0]


def _load_single(tmp_path, save, h=H, w=W, **ds_kw):
    path, img_dir = write_coco(tmp_path, [image(1, "x.png", h=h, w=w, _missing=True)], [])
    save(img_dir / "x.png")
    img, _ = CocoInstanceDataset(path, img_dir, **ds_kw)[0]
    return img


def test_grayscale_rgba_palette_and_16bit_become_rgb(tmp_path):
    gray = np.arange(H * W, dtype=np.uint8).reshape(H, W)
    img = _load_single(tmp_path / "l", lambda p: Image.fromarray(gray, "L").save(p))
    assert img.shape == (3, H, W) and torch.allclose(img, torch.from_numpy(gray / 255).float().expand(3, H, W))

    rgba = np.random.default_rng(0).integers(0, 256, (H, W, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: the stored RGB is kept
    img = _load_single(tmp_path / "rgba", lambda p: Image.fromarray(rgba, "RGBA").save(p))
    assert torch.allclose(img, torch.from_numpy(rgba[..., :3] / 255).float().permute(2, 0, 1))

    rgb = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    pal = Image.fromarray(rgb).quantize(colors=16)
    img = _load_single(tmp_path / "p", lambda p: pal.save(p))
    assert torch.allclose(img, torch.from_numpy(np.asarray(pal.convert("RGB")) / 255).float().permute(2, 0, 1))

    deep = (np.arange(H * W).reshape(H, W) * 341).astype(np.uint16)  # up to 65131
    img = _load_single(tmp_path / "i16", lambda p: Image.fromarray(deep).save(p))
    lo, hi = np.percentile(deep, (0.1, 99.9))  # its own range, stretched (not / 257)
    assert float(img.min()) == 0 and float(img.max()) == 1
    assert torch.allclose(img[0], torch.from_numpy(np.clip((deep - lo) / (hi - lo), 0, 1)).float(), atol=1 / 255)
    assert torch.equal(img[0], img[2])


def _exif_jpeg(path, raw_h, raw_w, orientation):
    """A JPEG stored as raw_h x raw_w with the left half dark and the right half bright."""
    arr = np.zeros((raw_h, raw_w, 3), dtype=np.uint8)
    arr[:, raw_w // 2:] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, quality=95, exif=exif.tobytes())


def test_exif_orientation_follows_the_json_size(tmp_path):
    # Orientation 6: displayed = stored rotated 90 degrees clockwise; the stored left half (dark)
    # ends up on top.
    img = _load_single(tmp_path / "t", lambda p: _exif_jpeg(p, 16, 24, 6), h=24, w=16)
    assert img.shape == (3, 24, 16)
    assert img[:, :10].mean() < 0.1 and img[:, 14:].mean() > 0.9

    img = _load_single(tmp_path / "r", lambda p: _exif_jpeg(p, 16, 24, 6), h=16, w=24)
    assert img.shape == (3, 16, 24)  # json describes the stored pixels: raw
    assert img[:, :, :10].mean() < 0.1 and img[:, :, 14:].mean() > 0.9

    path, img_dir = write_coco(tmp_path / "n", [image(1, "x.jpg", h=20, w=20, _missing=True), image(2)], [])
    _exif_jpeg(img_dir / "x.jpg", 16, 24, 6)
    ds = CocoInstanceDataset(path, img_dir)
    with pytest.warns(DataWarning, match=r"'x.jpg' \(id 1\).*24x16 \(EXIF-transposed 16x24\) does not match.*20x20"):
        _, t = ds[0]
    assert t["image_id"] == 2 and ds.skipped["unreadable_image"] == 1


def test_dataloader_with_workers_collates(tmp_path):
    path, img_dir = write_coco(tmp_path, [image(i) for i in range(1, 5)],
                               [ann(i, i, [rect(1, 1, 4 + i, 6)]) for i in range(1, 5)])
    ds = CocoInstanceDataset(path, img_dir)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate, num_workers=0)
    batches = list(loader)
    assert len(batches) == 2
    images, targets = batches[1]
    assert isinstance(images, list) and [t["image_id"] for t in targets] == [3, 4]
    assert targets[1]["masks"].sum() == 5 * 7
