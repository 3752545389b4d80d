"""COCO mask evaluation: conversion, COCOeval parity, results I/O, distributed gather."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

from isda.engine.evaluation import (
    STAT_NAMES,
    EvalResult,
    evaluate_masks,
    gather_results,
    predictions_to_coco_results,
    write_results_json,
)

# pycocotools' mask.decode (annToMask, used by these tests only) warns under numpy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Non-contiguous COCO ids; "kite" has no annotation at all.
CATEGORIES = [{"id": 3, "name": "car"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "kite"}]
CAT_IDS = [c["id"] for c in CATEGORIES]


def _rect(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _make_coco(tmp_path: Path) -> COCO:
    """Three images; small, medium and large instances; polygons; one uncompressed-RLE crowd."""
    images = [{"id": 101, "width": 200, "height": 160, "file_name": "a.jpg"},
              {"id": 205, "width": 120, "height": 96, "file_name": "b.jpg"},
              {"id": 309, "width": 160, "height": 160, "file_name": "c.jpg"}]
    polys = [  # (image_id, category_id, polygon)
        (101, 3, _rect(10, 10, 130, 120)),           # large
        (101, 7, _rect(140, 20, 190, 60)),           # medium
        (101, 7, [150, 100, 190, 100, 170, 150]),    # triangle, medium
        (205, 3, _rect(5, 5, 25, 25)),               # small
        (205, 3, _rect(40, 30, 90, 80)),             # medium
        (205, 7, _rect(95, 60, 115, 90)),            # small
        (309, 7, _rect(20, 20, 100, 140)),           # large
        (309, 3, _rect(110, 10, 150, 40)),           # medium
    ]
    anns = []
    sizes = {im["id"]: (im["height"], im["width"]) for im in images}
    for i, (img_id, cat_id, poly) in enumerate(polys, start=1):
        h, w = sizes[img_id]
        rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
        x, y, bw, bh = mask_utils.toBbox(rle).tolist()
        anns.append({"id": i, "image_id": img_id, "category_id": cat_id, "segmentation": [poly],
                     "area": float(mask_utils.area(rle)), "bbox": [x, y, bw, bh], "iscrowd": 0})
    crowd = np.zeros((160, 160), dtype=np.uint8)
    crowd[100:150, 110:155] = 1
    # COCO stores crowd regions as uncompressed RLE (column-major run lengths).
    flat = crowd.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    anns.append({"id": len(anns) + 1, "image_id": 309, "category_id": 3, "iscrowd": 1,
                 "segmentation": {"size": [160, 160], "counts": counts},
                 "area": float(crowd.sum()), "bbox": [110.0, 100.0, 45.0, 50.0]})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


@pytest.fixture
def coco(tmp_path: Path) -> COCO:
    return _make_coco(tmp_path)


def _gt_predictions(coco: COCO) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Every non-crowd GT instance as a score-1 prediction."""
    preds, ids = [], []
    for img_id in coco.getImgIds():
        img = coco.imgs[img_id]
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)) if not a["iscrowd"]]
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])).bool()
        assert masks.shape[1:] == (img["height"], img["width"])
        preds.append({
            "scores": torch.ones(len(anns)),
            "labels": torch.tensor([CAT_IDS.index(a["category_id"]) for a in anns], dtype=torch.int64),
            "masks": masks,
            "boxes": torch.zeros(len(anns), 4),
        })
        ids.append(img_id)
    return preds, ids


def _perturbed_predictions(coco: COCO, seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """GT with dropped instances, dilated/shifted masks, random scores and false positives."""
    rng = np.random.default_rng(seed)
    preds, ids = [], []
    for img_id in coco.getImgIds():
        img = coco.imgs[img_id]
        h, w = img["height"], img["width"]
        masks, labels = [], []
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
            if a["iscrowd"] or rng.random() < 0.25:
                continue
            m = coco.annToMask(a).astype(bool)
            op = rng.integers(3)
            if op == 1:
                m = ndimage.binary_dilation(m, iterations=int(rng.integers(1, 6)))
            elif op == 2:
                m = np.roll(m, (int(rng.integers(-8, 9)), int(rng.integers(-8, 9))), axis=(0, 1))
            masks.append(m)
            labels.append(CAT_IDS.index(a["category_id"]))
        for _ in range(3):  # false positives, sometimes empty
            m = np.zeros((h, w), dtype=bool)
            y0, x0 = int(rng.integers(0, h - 10)), int(rng.integers(0, w - 10))
            m[y0:y0 + int(rng.integers(0, 40)), x0:x0 + int(rng.integers(1, 40))] = True
            masks.append(m)
            labels.append(int(rng.integers(len(CAT_IDS))))
        preds.append({
            "scores": torch.from_numpy(rng.random(len(masks))).float(),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)),
            "boxes": torch.zeros(len(masks), 4),
        })
        ids.append(img_id)
    return preds, ids


def _reference_stats(coco: COCO, results: list[dict], img_ids: list[int] | None = None) -> list[float]:
    # Plain pycocotools, without "bbox" so loadRes takes the mask area (detectron2's practice).
    dets = [{k: v for k, v in r.items() if k != "bbox"} for r in copy.deepcopy(results)]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(dets), iouType="segm")
        if img_ids is not None:
            ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats[:6]]


def test_results_format(coco: COCO) -> None:
    preds, ids = _gt_predictions(coco)
    results = predictions_to_coco_results(preds, ids, CAT_IDS)
    assert len(results) == sum(len(p["scores"]) for p in preds)
    r = results[0]
    assert set(r) == {"image_id", "category_id", "segmentation", "score", "bbox"}
    assert isinstance(r["segmentation"]["counts"], str)
    assert r["category_id"] in CAT_IDS
    # bbox is the mask's xywh box.
    first = coco.loadAnns(coco.getAnnIds(imgIds=ids[0]))[0]
    assert r["bbox"] == pytest.approx(first["bbox"])
    json.dumps(results)  # JSON-serialisable as is


def test_ground_truth_as_predictions_gives_ap_1(coco: COCO) -> None:
    preds, ids = _gt_predictions(coco)
    res = evaluate_masks(coco, predictions_to_coco_results(preds, ids, CAT_IDS))
    assert set(res.stats) == set(STAT_NAMES)
    for name in STAT_NAMES:
        assert res.stats[name] == pytest.approx(1.0), name
    # "kite" has no ground truth: left out instead of -1/NaN.
    assert res.per_category == pytest.approx({"car": 1.0, "dog": 1.0})


@pytest.mark.parametrize("shift", [
    lambda i: i - 1,  # image, annotation and category ids from 0, as annotation tools export them
    lambda i: 7 * i + 2**60,  # non-contiguous and beyond float64's exact integers
])
def test_ground_truth_as_predictions_gives_ap_1_whatever_the_ids(coco: COCO, tmp_path: Path, shift) -> None:
    """pycocotools reads a matched id of 0 as "unmatched" (and keeps matched ids in floats): the AP would be
    capped below 100 without the renumbering inside evaluate_masks."""
    data = copy.deepcopy(coco.dataset)
    cat_ids = {c["id"]: shift(c["id"]) for c in data["categories"]}
    for im in data["images"]:
        im["id"] = shift(im["id"])
    for a in data["annotations"]:
        a["id"], a["image_id"], a["category_id"] = shift(a["id"]), shift(a["image_id"]), cat_ids[a["category_id"]]
    for c in data["categories"]:
        c["id"] = cat_ids[c["id"]]
    path = tmp_path / "shifted.json"
    path.write_text(json.dumps(data))
    with contextlib.redirect_stdout(io.StringIO()):
        shifted = COCO(str(path))
    preds, ids = _gt_predictions(coco)
    results = predictions_to_coco_results(preds, [shift(i) for i in ids], [cat_ids[c] for c in CAT_IDS])
    untouched, file_text = copy.deepcopy(results), path.read_text()
    res = evaluate_masks(shifted, results)
    assert [res.stats[k] for k in STAT_NAMES] == pytest.approx([1.0] * len(STAT_NAMES), abs=1e-12)
    assert res.per_category == pytest.approx({"car": 1.0, "dog": 1.0}, abs=1e-12)
    assert results == untouched and path.read_text() == file_text and shifted.dataset == data


def test_class_agnostic_ap_ignores_labels_only(coco: COCO) -> None:
    """Perfect masks with every label wrong: class-aware AP 0, class-agnostic AP 1 (no per-category table); a
    missed mask still costs the class-agnostic AP."""
    preds, ids = _gt_predictions(coco)
    results = predictions_to_coco_results(preds, ids, CAT_IDS)
    swapped = {CAT_IDS[0]: CAT_IDS[1], CAT_IDS[1]: CAT_IDS[0]}
    wrong = [{**r, "category_id": swapped.get(r["category_id"], CAT_IDS[2])} for r in results]
    assert evaluate_masks(coco, wrong).stats["AP"] == pytest.approx(0.0)
    agnostic = evaluate_masks(coco, wrong, class_agnostic=True)
    assert agnostic.stats["AP"] == pytest.approx(1.0) and agnostic.per_category == {}
    assert evaluate_masks(coco, wrong[1:], class_agnostic=True).stats["AP"] < 0.99


def test_perturbed_matches_cocoeval(coco: COCO) -> None:
    preds, ids = _perturbed_predictions(coco)
    results = predictions_to_coco_results(preds, ids, CAT_IDS)
    untouched = copy.deepcopy(results)
    res = evaluate_masks(coco, results)
    assert results == untouched  # loadRes mutates its input; ours must not
    expected = _reference_stats(coco, results)
    assert [res.stats[k] for k in STAT_NAMES] == pytest.approx(expected, abs=1e-12)
    assert 0.0 < res.stats["AP"] < 1.0
    # Every category with GT has all precision entries valid, so AP is their plain mean.
    assert np.mean(list(res.per_category.values())) == pytest.approx(res.stats["AP"])

    subset = [101, 309]
    res_sub = evaluate_masks(coco, results, image_ids=subset)
    assert [res_sub.stats[k] for k in STAT_NAMES] == pytest.approx(_reference_stats(coco, results, subset), abs=1e-12)
    assert res_sub.stats != res.stats


def test_results_json_round_trip(coco: COCO, tmp_path: Path) -> None:
    preds, ids = _perturbed_predictions(coco, seed=1)
    results = predictions_to_coco_results(preds, ids, CAT_IDS)
    out = tmp_path / "sub" / "results.json"
    write_results_json(results, out)
    assert sorted(os.listdir(out.parent)) == ["results.json"]  # no temp file left behind
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = coco.loadRes(str(out))
    assert len(loaded.anns) == len(results)
    # Decoded masks equal the predictions, in order.
    flat_masks = [m for p in preds for m in p["masks"].numpy()]
    for ann_id, m in zip(sorted(loaded.anns), flat_masks):
        np.testing.assert_array_equal(loaded.annToMask(loaded.anns[ann_id]), m.astype(np.uint8))


def test_empty_predictions_give_zero_ap(coco: COCO) -> None:
    preds = [{"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 96, 120, dtype=torch.bool), "boxes": torch.zeros(0, 4)}]
    results = predictions_to_coco_results(preds, [205], CAT_IDS)
    assert results == []
    res = evaluate_masks(coco, results)
    assert res.stats["AP"] == 0.0
    assert res.per_category == {"car": 0.0, "dog": 0.0}


def test_table_and_verbose(coco: COCO, capsys: pytest.CaptureFixture[str]) -> None:
    preds, ids = _perturbed_predictions(coco)
    results = predictions_to_coco_results(preds, ids, CAT_IDS)
    res = evaluate_masks(coco, results)
    assert capsys.readouterr().out == ""  # quiet by default
    evaluate_masks(coco, results, verbose=True)
    assert "Average Precision" in capsys.readouterr().out
    table = res.table()
    assert "car" in table and "dog" in table and "kite" not in table
    assert f"{100 * res.stats['AP']:.1f}" in table
    assert "n/a" in EvalResult(stats={k: -1.0 for k in STAT_NAMES}).table()


def test_gather_results_without_process_group() -> None:
    items = [{"a": 1}]
    assert gather_results(items) is items


def _gather_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        local = [{"image_id": rank * 10 + i, "rank": rank} for i in range(rank + 1)]
        gathered = gather_results(local)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def test_gather_results_two_processes(tmp_path: Path) -> None:
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = [{"image_id": 0, "rank": 0}, {"image_id": 10, "rank": 1}, {"image_id": 11, "rank": 1}]
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected
