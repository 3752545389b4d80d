"""labelme JSON files -> COCO json (``isda convert labelme``).

The labelme files and their images are generated here: a polygon, a rectangle, a circle, two rectangles of one
instance (a group_id), an ``__ignore__`` region and shapes that are no region."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isda.cli import main
from isda.config import get_preset
from isda.data import CocoInstanceDataset, DatasetError, DataWarning, build_transforms, decode_rle
from isda.data.labelme import labelme_to_coco

H, W = 40, 60


def shape(label: str, points: list, kind: str = "polygon", group: int | None = None) -> dict:
    return {"label": label, "points": points, "group_id": group, "shape_type": kind, "flags": {}}


def write_labelme(folder: Path, name: str, shapes: list[dict], size: tuple[int, int] = (H, W),
                  image_path: str | None = None) -> Path:
    """``name``.png (random pixels) and ``name``.json as labelme saves them."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    doc = {"version": "5.5.0", "flags": {}, "shapes": shapes, "imagePath": image_path or f"{name}.png",
           "imageData": None, "imageHeight": size[0], "imageWidth": size[1]}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def write_dataset(folder: Path) -> None:
    write_labelme(folder, "a", [
        shape("dog", [[10, 20], [2, 4]], "rectangle"),  # two opposite corners, in any order: x 2..10, y 4..20
        shape("cat", [[40, 20], [40, 10]], "circle"),  # centre (40, 20), radius 10
        shape("__ignore__", [[30, 30], [35, 30], [35, 35]]),
        shape("dog", [[50, 5]], "point"),
    ])
    write_labelme(folder, "b", [
        shape("cat", [[5, 5], [25, 5], [5, 25]]),  # a triangle
        shape("dog", [[30, 10], [40, 20]], "rectangle", group=1),  # one dog behind a post: two parts
        shape("dog", [[45, 10], [55, 20]], "rectangle", group=1),
        shape("dog", [[30, 30], [40, 30]], "line"),
    ])


def test_shapes_become_instances_with_their_areas_groups_and_categories(tmp_path: Path) -> None:
    write_dataset(tmp_path / "ann")
    with pytest.warns(DataWarning, match=r"left out 1 __ignore__, 1 line shapes, 1 point shapes"):
        done = labelme_to_coco(tmp_path / "ann", tmp_path / "coco.json")
    coco = json.loads((tmp_path / "coco.json").read_text())
    assert done.images == 2 and done.instances == 4 and done.skipped_instances == 3
    assert coco["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]  # sorted without a labels file
    assert [img["file_name"] for img in coco["images"]] == ["a.png", "b.png"]
    masks = {(a["image_id"], a["category_id"]): decode_rle(a["segmentation"]) for a in coco["annotations"]}
    assert len(masks) == 4  # the two grouped rectangles are one instance
    rect = masks[(1, 2)]
    assert rect.shape == (H, W) and rect[4:20, 2:10].all() and rect.sum() == 8 * 16
    assert coco["annotations"][0]["bbox"] == [2.0, 4.0, 8.0, 16.0] and coco["annotations"][0]["area"] == 128
    circle = masks[(1, 1)]
    assert abs(int(circle.sum()) - math.pi * 100) < 0.05 * math.pi * 100 and circle[20, 40] and not circle[20, 51]
    triangle = masks[(2, 1)]
    assert abs(int(triangle.sum()) - 200) < 25 and triangle[6, 6] and not triangle[20, 20]
    group = masks[(2, 2)]
    assert group[10:20, 30:40].all() and group[10:20, 45:55].all() and not group[:, 41:44].any()
    assert group.sum() == 200


def test_a_labels_file_orders_the_categories_and_must_hold_every_label(tmp_path: Path) -> None:
    write_dataset(tmp_path / "ann")
    labels = tmp_path / "labels.txt"
    labels.write_text("__ignore__\n_background_\ndog\nbird\ncat\n")
    with pytest.warns(DataWarning):
        done = labelme_to_coco(tmp_path / "ann", tmp_path / "coco.json", labels)
    assert done.categories == {1: "dog", 2: "bird", 3: "cat"}  # listed even when unused, in the file's order
    labels.write_text("dog\n")
    with pytest.raises(DatasetError, match=r"a\.json: label 'cat' is not in .*labels\.txt"):
        labelme_to_coco(tmp_path / "ann", tmp_path / "coco2.json", labels)
    assert not (tmp_path / "coco2.json").exists()
    labels.write_text("dog\ncat\ndog\n")
    with pytest.raises(DatasetError, match="listed twice: dog"):
        labelme_to_coco(tmp_path / "ann", tmp_path / "coco2.json", labels)


def test_cli_end_to_end_then_the_dataset_loads_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_dataset(tmp_path / "ann")
    out = tmp_path / "out" / "coco.json"
    with pytest.warns(DataWarning):
        assert main(["convert", "labelme", str(tmp_path / "ann"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 images, 4 instances, 2 categories (1: cat, 2: dog)" in printed
    assert f"isda train --ann {out} --images {tmp_path / 'ann'}" in printed
    ds = CocoInstanceDataset(out, tmp_path / "ann", build_transforms(get_preset("isda_tiny").data, False), train=False)
    assert sorted(len(ds[i][1]["labels"]) for i in range(len(ds))) == [2, 2]


def _not_json(folder: Path) -> None:
    (folder / "a.json").write_text("{ broken")


def _no_shapes(folder: Path) -> None:
    (folder / "a.json").write_text(json.dumps({"imagePath": "a.png"}))


def _missing_image(folder: Path) -> None:
    (folder / "a.png").unlink()


def _size(folder: Path) -> None:
    write_labelme(folder, "a", [shape("dog", [[1, 1], [5, 5]], "rectangle")], size=(H + 1, W))


def _two_points(folder: Path) -> None:
    write_labelme(folder, "a", [shape("dog", [[1, 1], [5, 5]])])


def _bad_points(folder: Path) -> None:
    write_labelme(folder, "a", [shape("dog", [[1, "x"], [5, 5], [1, 5]])])


def _no_label(folder: Path) -> None:
    write_labelme(folder, "a", [shape("", [[1, 1], [5, 5]], "rectangle")])


def _nothing(folder: Path) -> None:
    for name in ("a", "b"):
        write_labelme(folder, name, [shape("__ignore__", [[1, 1], [5, 5]], "rectangle")])


@pytest.mark.parametrize("damage, fragment", [
    (_not_json, "a.json: not a readable JSON file"),
    (_no_shapes, "a.json: not a labelme file"),
    (_missing_image, "a.json: its image a.png: "),
    (_size, "a.json: imageHeight x imageWidth 41x60 differ from its image a.png (40x60)"),
    (_two_points, "a.json: shapes[0] (dog): a polygon needs at least 3 points, got 2"),
    (_bad_points, "a.json: shapes[0] (dog): points must be a list of [x, y] numbers"),
    (_no_label, "a.json: shapes[0]: no label"),
    (_nothing, "no instance (a polygon, rectangle or circle) in any of the 2 labelme file(s)"),
], ids=["json", "not_labelme", "missing_image", "size", "two_points", "bad_points", "no_label", "nothing"])
def test_bad_input_is_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture, damage, fragment,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ISDA_DEBUG", raising=False)
    write_dataset(tmp_path / "ann")
    damage(tmp_path / "ann")
    out = tmp_path / "coco.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # b.json's left-out shapes: not what this test is about
        assert main(["convert", "labelme", str(tmp_path / "ann"), "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("isda convert labelme: error: "), lines
    assert fragment in lines[0]
    assert not out.exists()
