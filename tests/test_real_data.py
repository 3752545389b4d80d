"""Real annotated data from outside our generator: the nuclei image and label image shipped in the stardist wheel
(benchmarks/real_nuclei.py: conversion round trip, sizes fitted to it, learning) and the labelme example photos
shipped in labelme's source package (benchmarks/real_labelme.py: conversion against labelme's own); `make
real-data` downloads both."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from benchmarks.real_labelme import FOLDER as LABELME
from benchmarks.real_nuclei import CACHE, MEMBERS, prepare
from isda.config import get_preset
from isda.data import CocoInstanceDataset, DataWarning, build_transforms, decode_rle, labelme_to_coco, load_rgb
from isda.data.sizing import dataset_stats, fit_sizes

from engine_utils import single_thread

SOURCES = {k: CACHE / m.rsplit("/", 1)[1] for k, m in MEMBERS.items()}
for needed in (*SOURCES.values(), LABELME / "reference.json"):
    if not needed.is_file():
        raise RuntimeError(f"{needed} is missing: run `make real-data` (make test does)")


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory):
    return prepare(SOURCES, tmp_path_factory.mktemp("nuclei"))


def test_label_images_round_trip_through_coco_exactly(nuclei):
    for split, (ann, images) in nuclei.items():
        coco = json.loads(ann.read_text())
        for info in coco["images"]:
            labels = np.array(Image.open(images.parent / "labels" / info["file_name"]))
            ids = [i for i in np.unique(labels) if i]
            anns = [a for a in coco["annotations"] if a["image_id"] == info["id"]]
            assert len(anns) == len(ids) > 20  # every nucleus, the ones cut by the tile border included
            masks = sorted((decode_rle(a["segmentation"]) for a in anns), key=lambda m: m.sum())
            truth = sorted(((labels == i).astype(np.uint8) for i in ids), key=lambda m: m.sum())
            for got, want in zip(masks, truth):
                assert np.array_equal(got, want)


def test_the_16_bit_microscopy_tiles_are_read_visibly(nuclei):
    ann, images = nuclei["test"]
    path = images / json.loads(ann.read_text())["images"][0]["file_name"]
    raw = np.array(Image.open(path))
    assert raw.dtype == np.uint16 and 100 < raw.max() <= 255
    rgb = load_rgb(path)  # 16-bit values that fit in 8 bits are taken as they are, not divided by 257 (black)
    assert rgb.dtype == np.uint8 and all(np.array_equal(rgb[..., c], raw) for c in range(3))


def test_fit_sizes_raises_the_input_size_for_the_nuclei(nuclei):
    train = CocoInstanceDataset(*nuclei["train"], train=True)
    stats = dataset_stats(train.coco)
    assert 15 < stats.median_instance_px < 25 and stats.median_short_side == 256
    data, line = fit_sizes(dataclasses.replace(get_preset("isda_tiny").data, fit_sizes=True), stats, num_queries=100)
    assert line is not None and data.test_short_side >= 256  # at least native resolution, not 128
    image, target = CocoInstanceDataset(*nuclei["train"], build_transforms(data, True), train=True)[0]
    assert image.shape[-2:] == (128, 128) and len(target["masks"]) > 0


def test_the_tiny_preset_learns_real_nuclei_from_scratch(nuclei, tmp_path):
    """The first 100 steps of a 500-step schedule, one thread: the preset's defaults (its input size fitted to the
    nuclei, the held-out tile predicted in windows of its training crops), from scratch, scored on the held-out tile:
    AP50 of at least 40 and AP of at least 15. The same steps evaluated on the whole tile at the fitted size (no
    windows) scored AP50 of about 10; a random model scores 0. The tile holds 29 nuclei, so AP swings by several
    points between evaluations."""
    from isda.engine import train

    cfg = get_preset("isda_tiny")
    cfg.train.max_steps = 500
    with single_thread():  # the machine's 2 cores are shared with the other test worker
        summary = train(cfg, *nuclei["train"], *nuclei["test"], out_dir=tmp_path / "run", max_iters=100,
                        log=lambda _m: None)
    print(f"nuclei, 100 steps: held-out AP {100 * summary['val']['AP']:.1f}, AP50 {100 * summary['val']['AP50']:.1f}")
    assert summary["iteration"] == 100
    assert summary["val"]["AP50"] >= 0.40 and summary["val"]["AP"] >= 0.15


def test_labelmes_examples_convert_to_what_labelme_itself_exports(tmp_path):
    """The three annotated photos: the same instances per image and class as labelme's own COCO export of them,
    each mask within IoU 0.9 of its counterpart there (the two rasterise the same polygons; labelme's export
    writes polygons, ours RLE), the grouped person one instance, the two __ignore__ regions left out."""
    from pycocotools.coco import COCO

    with pytest.warns(DataWarning, match="left out 2 __ignore__"):
        done = labelme_to_coco(LABELME / "data_annotated", tmp_path / "coco.json", LABELME / "labels.txt")
    ours, theirs = COCO(str(tmp_path / "coco.json")), COCO(str(LABELME / "reference.json"))
    assert done.images == 3 and done.instances == len(theirs.getAnnIds()) == 12

    def instances(coco: COCO) -> dict[tuple[str, str], list[np.ndarray]]:
        out: dict[tuple[str, str], list[np.ndarray]] = {}
        for a in coco.loadAnns(coco.getAnnIds()):
            key = (coco.imgs[a["image_id"]]["file_name"].rsplit("/", 1)[-1], coco.cats[a["category_id"]]["name"])
            out.setdefault(key, []).append(coco.annToMask(a).astype(bool))
        return out

    mine, reference = instances(ours), instances(theirs)
    assert {k: len(v) for k, v in mine.items()} == {k: len(v) for k, v in reference.items()}
    assert len(mine[("2011_000003.jpg", "person")]) == 2  # one of them drawn as two polygons with a group_id
    for key, masks in mine.items():
        for mask in masks:
            best = max((mask & other).sum() / (mask | other).sum() for other in reference[key])
            assert best > 0.9, (key, best)


def test_labelmes_photos_split_into_two_to_train_and_one_held_out(tmp_path):
    """benchmarks.real_labelme's fine-tuning split: every converted instance in exactly one split, the held-out
    photo alone in test, both splits with the same 20 VOC classes (ids as the labels file orders them)."""
    from benchmarks.real_labelme import HELD_OUT, prepare as split_photos
    from pycocotools.coco import COCO

    with pytest.warns(DataWarning, match="left out 2 __ignore__"):
        whole = labelme_to_coco(LABELME / "data_annotated", tmp_path / "whole.json", LABELME / "labels.txt")
    data = split_photos(LABELME, tmp_path / "split")
    train, test = (COCO(str(data[s][0])) for s in ("train", "test"))
    assert [im["file_name"].rsplit("/", 1)[-1] for im in test.dataset["images"]] == [HELD_OUT]
    assert len(train.dataset["images"]) == 2 and HELD_OUT not in str(train.dataset["images"])
    assert len(train.getAnnIds()) + len(test.getAnnIds()) == whole.instances == 12
    assert train.dataset["categories"] == test.dataset["categories"] and len(test.dataset["categories"]) == 20
    for coco in (train, test):  # the images open where the split says they are
        assert all((data["train"][1] / im["file_name"]).is_file() for im in coco.dataset["images"])


def test_a_preset_variant_runs_the_page_command_with_its_setting_and_joins_the_page(tmp_path, monkeypatch):
    import shutil

    from benchmarks import real_nuclei
    from benchmarks.provenance import ROOT

    page = tmp_path / "real_data.md"
    shutil.copyfile(ROOT / "docs" / "real_data.json", page.with_suffix(".json"))
    seen = {}

    def train(data, run_dir, length, threads, extra):
        seen.update(run_dir=run_dir, length=length, extra=extra)
        return {"command": "isda train ...", "data": {"test_short_side": 160},
                "curve": [{"iter": 7, "train_s": 1.0, "AP": 12.5, "AP50": 30.0, "AP75": 5.0}],
                "timing": {"load_before": 0.5, "load_after": 0.6, "other_cpus": 0.0}}

    monkeypatch.setattr(real_nuclei, "train_as_user", train)
    monkeypatch.setattr(real_nuclei, "prepare", lambda sources, root: {})
    monkeypatch.setattr(real_nuclei, "fetch", lambda: {})
    before = json.loads(page.with_suffix(".json").read_text())
    result = real_nuclei.variant("fit_12px", tmp_path, page, 2)
    # The page's own run length, the variant's setting, its own directory; the rest of the page's JSON kept.
    assert seen == {"run_dir": tmp_path / "fit_12px", "length": before["length"],
                    "extra": ["--set", "data.fit_instance_px=12"]}
    saved = json.loads(page.with_suffix(".json").read_text())
    assert saved == result and saved["curve"] == before["curve"] and saved.get("finetune") == before.get("finetune")
    run = saved["variants"]["fit_12px"]
    assert run["setting"] == "data.fit_instance_px=12" and run["_meta"]["depends_on"].keys() == {"preset:isda_tiny"}
    text = page.read_text()
    assert "| the median instance fitted to 12 px instead of 24 | `data.fit_instance_px=12` | 160 px | 7 | 12.5 | 30.0 |" in text
    assert f"| the preset's defaults (above) |  | {before['data']['test_short_side']} px | {before['steps']} |" in text


def test_a_variant_without_the_page_run_says_which_file_is_missing(tmp_path):
    from benchmarks import real_nuclei

    with pytest.raises(SystemExit, match=r"real_data\.json: file not found \(write the page's run first"):
        real_nuclei.variant("fixed_input", tmp_path, tmp_path / "real_data.md", 2)
