"""Accuracy under the same CPU budget on the generated shapes dataset (full mode; long).

* ISDA tiny (``isda.engine.train`` with ``train.time_budget_s``; its preset recipe) against torchvision
  Mask R-CNN R18-FPN (:mod:`benchmarks.maskrcnn_shapes`), both from scratch on the same data, same
  augmentation and the same thread count; COCO mask AP (``isda.evaluation.evaluate_masks``) of each at
  every budget (default 8 and 30 minutes of training time, evaluation excluded; one fresh run per
  budget and model, since both lr schedules follow the budget).
* The paper's two ablations in miniature, ISDA tiny at the first budget: MP + KP vs neither, and mask
  stride 8 vs 4 vs 2 (the default, MP + KP at stride 4, is the main run's result at that budget).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from isda.config import apply_overrides, get_preset
from isda.data import make_shapes_dataset

from .maskrcnn_shapes import train_maskrcnn

ABLATIONS = {
    "no_mp_no_kp": {"model.mask_position": False, "model.kernel_position": False},
    "mask_stride_8": {"model.mask_stride": 8},
    "mask_stride_2": {"model.mask_stride": 2},
}


def _isda_run(cfg, data, out_dir: Path, budget: float, log) -> dict[str, Any]:
    """One fresh ISDA training run with ``train.time_budget_s = budget`` (its lr schedule follows the budget)."""
    from isda.engine import train

    c = copy.deepcopy(cfg)
    c.train.time_budget_s = float(budget)
    start = time.perf_counter()
    summary = train(c, *data["train"], *data["val"], out_dir=out_dir, device="cpu",
                    log=lambda m: log("    " + m.replace("\n", "\n    ")))
    log(f"    isda at {budget:.0f} s: mask AP {100 * summary['val']['AP']:.1f} ({summary['iteration']} steps)")
    return {"ap": summary["val"], "iterations": summary["iteration"], "epochs": summary["epoch"],
            "train_time_s": summary["train_time_s"], "wall_s": time.perf_counter() - start}


def run(out_root: Path, budgets_s: list[float], ablation_budget_s: float | None, num_train: int = 2000,
        num_val: int = 200, maskrcnn_lr: float | None = None, maskrcnn_optimizer: str = "adamw",
        maskrcnn_roi_batch: int = 128, ablations: bool = True, log=print) -> dict[str, Any]:
    """Each budget is a separate pair of fresh runs (ISDA, then Mask R-CNN), so that both get their whole
    budget-following lr schedule; the ablations are fresh ISDA runs at ``ablation_budget_s``."""
    out_root = Path(out_root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = make_shapes_dataset(out_root / f"shapes_{num_train}_{num_val}", num_train=num_train, num_val=num_val,
                               image_size=128, seed=0)
    cfg = get_preset("isda_tiny")
    t = cfg.train
    results: dict[str, Any] = {
        "budgets_s": sorted(budgets_s), "num_train": num_train, "num_val": num_val, "image_size": 128,
        "isda_preset": "isda_tiny", "isda_recipe": {"optimizer": "adamw", "lr": t.lr, "batch_size": t.batch_size,
                                                    "clip_max_norm": t.clip_max_norm, "weight_decay": t.weight_decay,
                                                    "num_queries": cfg.model.num_queries,
                                                    "num_detections": cfg.model.num_detections},
        "isda": {}, "maskrcnn": {}}
    for budget in sorted(budgets_s):
        key = str(int(budget))
        log(f"  accuracy: ISDA tiny, budget {budget:.0f} s")
        results["isda"][key] = _isda_run(cfg, data, out_root / f"isda_{key}s_{stamp}", budget, log)
        log(f"  accuracy: Mask R-CNN R18-FPN, budget {budget:.0f} s")
        results["maskrcnn"][key] = train_maskrcnn(cfg, *data["train"], *data["val"], budget, lr=maskrcnn_lr,
                                                  optimizer=maskrcnn_optimizer, roi_batch=maskrcnn_roi_batch,
                                                  log=log)
    if ablations and ablation_budget_s:
        results["ablation_budget_s"] = ablation_budget_s
        results["ablations"] = {}
        for name, overrides in ABLATIONS.items():
            log(f"  ablation {name}: {overrides}, budget {ablation_budget_s:.0f} s")
            c = apply_overrides(get_preset("isda_tiny"), dict(overrides)).validate()
            res = _isda_run(c, data, out_root / f"isda_{name}_{stamp}", ablation_budget_s, log)
            results["ablations"][name] = {**res, "overrides": overrides}
    return results
