"""The built-in synthetic shapes dataset: exact round trip through the COCO loader, determinism,
atomic/complete regeneration, and the properties the generator promises."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from isda.data import CocoInstanceDataset, DataWarning, coco_split_paths, shapes


pytestmark = pytest.mark.usefixtures("one_thread")


def test_round_trip_masks_equal_generator(tmp_path):
    size = (72, 96)  # non-square on purpose (H != W catches transposed RLE / arrays)
    ann = shapes.generate_split(tmp_path, "train", 8, image_size=size, seed=3)
    assert ann == tmp_path / "annotations" / "instances_train.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # a clean generated file raises no warning
        ds = CocoInstanceDataset(*coco_split_paths(tmp_path, "train"))
    assert len(ds) == 8 and ds.class_names == list(shapes.CLASSES) and ds.num_classes == 5
    assert not ds.skipped
    total = 0
    for i in range(len(ds)):
        img, instances = shapes.generate_image(shapes.image_rng(3, "train", i), size)
        image, target = ds[i]
        assert image.shape == (3, *size) and image.dtype == torch.float32
        assert torch.equal((image * 255).round().to(torch.uint8), torch.from_numpy(img).permute(2, 0, 1))
        assert target["image_id"] == i + 1 and target["orig_size"] == size
        assert target["labels"].tolist() == [label for label, _ in instances]
        expected = torch.from_numpy(np.stack([m for _, m in instances]))
        assert target["masks"].dtype == torch.bool and torch.equal(target["masks"], expected)
        total += len(instances)
    assert total >= 2 * len(ds)


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = shapes.generate_split(tmp_path / "a", "val", 5, image_size=64, seed=11)
    b = shapes.generate_split(tmp_path / "b", "val", 5, image_size=64, seed=11)
    c = shapes.generate_split(tmp_path / "c", "val", 5, image_size=64, seed=12)
    assert a.read_bytes() == b.read_bytes()
    for i in range(5):
        name = f"{i:06d}.png"
        assert (tmp_path / "a" / "val" / name).read_bytes() == (tmp_path / "b" / "val" / name).read_bytes()
    assert a.read_bytes() != c.read_bytes()
    # A split's image i does not depend on the split size.
    d = shapes.generate_split(tmp_path / "d", "val", 2, image_size=64, seed=11)
    assert json.loads(d.read_text())["annotations"] == [
        x for x in json.loads(a.read_text())["annotations"] if x["image_id"] <= 2]


def test_json_is_coco_with_compressed_rle(tmp_path):
    ann = shapes.generate_split(tmp_path, "train", 3, image_size=48, seed=0)
    data = json.loads(ann.read_text())
    assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4, 5]
    assert [c["name"] for c in data["categories"]] == list(shapes.CLASSES)
    for a in data["annotations"]:
        assert isinstance(a["segmentation"]["counts"], str) and a["segmentation"]["size"] == [48, 48]
        assert a["iscrowd"] == 0 and a["area"] >= 20 and len(a["bbox"]) == 4
    for img in data["images"]:
        assert Image.open(tmp_path / "train" / img["file_name"]).size == (48, 48)


def test_generator_properties():
    rng = np.random.default_rng(0)
    counts, labels_seen, dup_images = [], set(), 0
    for _ in range(60):
        image, instances = shapes.generate_image(rng, 128)
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        masks = np.stack([m for _, m in instances])
        assert (masks.sum(0) <= 1).all(), "masks must be disjoint (occlusion handled)"
        assert (masks.reshape(len(masks), -1).sum(1) >= 20).all()
        counts.append(len(instances))
        labels = [label for label, _ in instances]
        labels_seen |= set(labels)
        # near-identical instances: same class and same median colour, different positions
        colours = [np.median(image[m], axis=0) for m in masks]
        if any(labels[i] == labels[j] and np.abs(colours[i] - colours[j]).sum() < 20
               for i in range(len(labels)) for j in range(i)):
            dup_images += 1
    assert 2 <= min(counts) and max(counts) <= 6 and 3 <= np.mean(counts) <= 5
    assert labels_seen == set(range(len(shapes.CLASSES)))
    assert dup_images >= 5


def test_knobs_and_sizes():
    rng = np.random.default_rng(1)
    image, instances = shapes.generate_image(rng, (40, 100), min_instances=1, max_instances=1)
    assert image.shape == (40, 100, 3) and len(instances) <= 1
    with pytest.raises(TypeError, match="colour_count"):
        shapes.generate_image(rng, 64, colour_count=3)


def test_make_shapes_dataset_skips_complete_and_regenerates_incomplete(tmp_path):
    out = shapes.make_shapes_dataset(tmp_path, num_train=4, num_val=2, image_size=32, seed=5)
    assert set(out) == {"train", "val"}
    train_ann, train_dir = out["train"]
    assert (train_ann, train_dir) == coco_split_paths(tmp_path, "train")
    stamp = train_ann.stat().st_mtime_ns
    first = train_ann.read_bytes()

    shapes.make_shapes_dataset(tmp_path, num_train=4, num_val=2, image_size=32, seed=5)
    assert train_ann.stat().st_mtime_ns == stamp  # complete: left alone

    (train_dir / "000002.png").unlink()  # half-written dataset: regenerated
    shapes.make_shapes_dataset(tmp_path, num_train=4, num_val=2, image_size=32, seed=5)
    assert (train_dir / "000002.png").is_file() and train_ann.read_bytes() == first

    out["val"][0].unlink()  # json missing (written last): regenerated
    shapes.make_shapes_dataset(tmp_path, num_train=4, num_val=2, image_size=32, seed=5)
    assert out["val"][0].is_file()

    shapes.make_shapes_dataset(tmp_path, num_train=3, num_val=2, image_size=32, seed=5)  # other params
    assert len(json.loads(train_ann.read_text())["images"]) == 3
    assert sorted(p.name for p in train_dir.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert not list(tmp_path.rglob("*.tmp"))
