"""COCO mask-AP evaluation: a model over a dataset (``evaluate``), prediction -> COCO results conversion,
COCOeval wrapper, result I/O.

Predictions follow the torchvision detection convention (one dict per image with ``scores`` [K],
``labels`` [K] contiguous 0..C-1, ``masks`` bool [K, H, W] at the original image size, ``boxes``
[K, 4] xyxy). Results are standard COCO results-JSON entries, so any COCO tool can read them.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import CocoInstanceDataset, collate
from ..fileio import atomic_open
from .amp import autocast
from .distributed import broadcast_object, get_rank, get_world_size, is_main_process, unwrap

__all__ = [
    "STAT_NAMES",
    "EvalResult",
    "evaluate",
    "evaluate_masks",
    "gather_results",
    "predictions_to_coco_results",
    "rle_result",
    "write_results_json",
]

# Order of COCOeval.stats[:6] for iouType="segm".
STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def predictions_to_coco_results(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    cat_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """Convert per-image predictions to COCO segmentation results entries.

    ``image_ids[i]`` is the original COCO id of ``predictions[i]``; ``cat_ids[label]`` maps a
    contiguous label to its COCO category id. Each detection becomes
    ``{"image_id", "category_id", "segmentation" (RLE, counts as str), "score", "bbox" (xywh of the
    mask)}``. Empty masks are kept: they are legitimate (false-positive) detections.
    """
    if len(predictions) != len(image_ids):
        raise ValueError(f"{len(predictions)} predictions but {len(image_ids)} image ids")
    results: list[dict[str, Any]] = []
    for pred, image_id in zip(predictions, image_ids):
        scores = pred["scores"].detach().cpu().tolist()
        if not scores:
            continue
        labels = pred["labels"].detach().cpu().tolist()
        masks = pred["masks"].detach().cpu().numpy().astype(np.uint8)
        # pycocotools encodes column-major [H, W, K] uint8 arrays.
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
        results += [rle_result(image_id, cat_ids[label], rle, score) for score, label, rle in zip(scores, labels, rles)]
    return results


def rle_result(image_id: int, category_id: int, rle: Mapping[str, Any], score: float) -> dict[str, Any]:
    """One COCO results entry for a pycocotools RLE (``counts`` bytes); ``bbox`` is the mask's xywh."""
    return {
        "image_id": int(image_id),
        "category_id": int(category_id),
        # JSON cannot hold bytes; loadRes/COCOeval accept str counts.
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "score": float(score),
        "bbox": [float(v) for v in mask_utils.toBbox(rle).tolist()],
    }


@dataclass
class EvalResult:
    """COCO mask-AP summary.

    ``stats``: AP, AP50, AP75, APs, APm, APl on the 0-1 scale exactly as COCOeval reports them
    (-1 where COCOeval has nothing to measure, e.g. APs when no small ground truth exists).
    ``per_category``: category name -> AP (0-1) for categories with ground truth in the evaluated
    images; categories without ground truth are left out, so no value is NaN or -1.
    """

    stats: dict[str, float]
    per_category: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        """Human-readable summary on the usual 0-100 scale (overall row + per-category table)."""

        def fmt(v: float) -> str:
            return "  n/a" if v < 0 else f"{100.0 * v:5.1f}"

        lines = ["  ".join(f"{k:>5}" for k in STAT_NAMES), "  ".join(fmt(self.stats[k]) for k in STAT_NAMES)]
        if self.per_category:
            width = max(8, *(len(n) for n in self.per_category))
            cells = [f"{name:<{width}} {fmt(ap)}" for name, ap in self.per_category.items()]
            cols = 3
            header = " | ".join([f"{'category':<{width}} {'AP':>5}"] * min(cols, len(cells)))
            lines += ["", header, "-" * len(header)]
            lines += [" | ".join(cells[i:i + cols]) for i in range(0, len(cells), cols)]
        return "\n".join(lines)


def _empty_results_coco(coco_gt: COCO) -> COCO:
    """A results COCO with no detections (``loadRes`` indexes ``anns[0]`` and fails on [])."""
    res = COCO()
    res.dataset = {"images": list(coco_gt.dataset["images"]),
                   "categories": list(coco_gt.dataset["categories"]),
                   "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def evaluate_masks(
    coco_gt: COCO,
    results: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int] | None = None,
    verbose: bool = False,
    class_agnostic: bool = False,
) -> EvalResult:
    """COCO segmentation AP of ``results`` against ``coco_gt``.

    ``image_ids`` restricts evaluation to those images (e.g. a validation subset); otherwise every
    ground-truth image counts. ``class_agnostic``: every category counts as one (COCOeval's
    ``useCats=0``): the AP of the masks and their ranking alone, so its difference to the class-aware AP is
    what wrong labels cost. COCOeval's printing is suppressed unless ``verbose``. Any ids are fine
    (from 0, non-contiguous, huge): COCOeval runs on a renumbered copy; ``coco_gt`` and ``results`` are
    left as they are.
    """
    coco_gt, dets, image_ids = _renumbered(coco_gt, results, image_ids)
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        coco_dt = coco_gt.loadRes(dets) if dets else _empty_results_coco(coco_gt)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="segm")
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(set(image_ids))
        coco_eval.params.useCats = int(not class_agnostic)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats)}
    return EvalResult(stats=stats, per_category={} if class_agnostic else _per_category_ap(coco_gt, coco_eval))


def _renumbered(coco_gt: COCO, results: Sequence[Mapping[str, Any]], image_ids: Sequence[int] | None
                ) -> tuple[COCO, list[dict[str, Any]], list[int] | None]:
    """Ground truth, detections and image ids with image, annotation and category ids renumbered 1..N.

    COCOeval stores the id of a detection's matched ground truth in a float array where 0 means "unmatched":
    a ground truth with annotation id 0 can never be matched (annotation tools export ids from 0), and ids
    beyond 2**53 do not survive the float. The copy is shallow (segmentations are shared, not copied).
    """
    images = {old: new for new, old in enumerate(sorted(coco_gt.imgs), 1)}
    cats = {old: new for new, old in enumerate(sorted(coco_gt.cats), 1)}
    data = coco_gt.dataset
    gt = COCO()
    gt.dataset = {
        **data,
        "images": [{**im, "id": images[im["id"]]} for im in data["images"]],
        "annotations": [{**a, "id": k, "image_id": images[a["image_id"]], "category_id": cats[a["category_id"]]}
                        for k, a in enumerate(data["annotations"], 1)],
        "categories": [{**c, "id": cats[c["id"]]} for c in data["categories"]],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    unknown = sorted({r["image_id"] for r in results} - images.keys())
    if unknown:
        raise ValueError(f"results refer to image ids not in the ground truth, e.g. {unknown[0]}")
    # New dicts: loadRes writes area/id/iscrowd into its entries. "bbox" is dropped (as detectron2 does)
    # because loadRes would otherwise take the box area as the detection area, which misassigns detections
    # to the small/medium/large ranges of segm evaluation. Detections of a category the ground truth does
    # not have are dropped: COCOeval would ignore them anyway.
    dets = [{**{k: v for k, v in r.items() if k != "bbox"}, "image_id": images[r["image_id"]],
             "category_id": cats[r["category_id"]]} for r in results if r["category_id"] in cats]
    ids = None if image_ids is None else [images[int(i)] for i in image_ids if int(i) in images]
    return gt, dets, ids


def _per_category_ap(coco_gt: COCO, coco_eval: COCOeval) -> dict[str, float]:
    # precision: [IoU thresholds, recall points, categories, area ranges, max dets]; -1 = no GT.
    precision = coco_eval.eval["precision"]
    area_all = coco_eval.params.areaRngLbl.index("all")
    out: dict[str, float] = {}
    # evaluate() turns catIds into numpy ints, which COCO.loadCats rejects: index cats directly.
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, area_all, -1]
        p = p[p > -1]
        if p.size:
            ap = float(np.mean(p))
            if not math.isnan(ap):
                out[coco_gt.cats[int(cat_id)]["name"]] = ap
    return out


def write_results_json(results: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write results JSON atomically: a reader never sees a half-written file."""
    with atomic_open(path, "w") as f:
        json.dump(list(results), f)


def gather_results(results: list[Any]) -> list[Any]:
    """Concatenate per-rank result lists across a torch.distributed group.

    Returns the concatenation (rank 0's entries first, then rank 1's, ...) on *every* rank, so any
    rank may evaluate; without an initialised process group it returns ``results`` unchanged.
    Collective: every rank must call it.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return results
    gathered: list[list[Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    return [r for part in gathered for r in (part or [])]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: CocoInstanceDataset, device: torch.device | str, batch_size: int = 1,
             *, num_workers: int = 0, amp: str = "none", window: int = 0) -> tuple[EvalResult, list[dict[str, Any]]]:
    """COCO mask AP of ``model`` on ``dataset`` (built with ``train=False``), masks at the original size; images
    larger than ``window`` px (``data.test_window``; 0: none) predicted window by window.

    Under torch.distributed each process predicts every world_size-th image and the results are
    gathered; every process returns the same (EvalResult, COCO results list). The model's train/eval
    mode is restored afterwards.
    """
    from ..tiling import predict_in_windows  # tiling imports this module

    device = torch.device(device)
    net = unwrap(model)
    was_training = net.training
    net.eval()
    indices = list(range(get_rank(), len(dataset), get_world_size()))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices, collate_fn=collate,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    results: list[dict[str, Any]] = []
    for images, targets in tqdm(loader, desc="eval", leave=False, dynamic_ncols=True, disable=not is_main_process()):
        images, sizes = [im.to(device, non_blocking=True) for im in images], [tuple(t["orig_size"]) for t in targets]
        with autocast(device, amp):
            preds = predict_in_windows(net, images, sizes, window) if window else net(images, output_sizes=sizes)
        # Convert per batch: full-size masks of a whole dataset would not fit in memory.
        results += predictions_to_coco_results(preds, [t["image_id"] for t in targets], dataset.cat_ids)
    net.train(was_training)
    results = gather_results(results)
    # COCOeval is single-threaded and slow: run it once, on rank 0, and share the numbers.
    summary = evaluate_masks(dataset.coco, results, image_ids=dataset.ids) if is_main_process() else None
    return broadcast_object(summary), results
