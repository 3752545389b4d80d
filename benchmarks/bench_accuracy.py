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

from .maskrcnn_shapes import ROI_BATCH, train_maskrcnn

ABLATIONS = {
    "no_mp_no_kp": {"model.mask_position": False, "model.kernel_position": False},
    "mask_stride_8": {"model.mask_stride": 8},
    "mask_stride_2": {"model.mask_stride": 2},
}
# Issue 7's convergence levers, each switched off (the preset's) or on (the others) alone, at the ablation budget.
LEVERS = {
    "hybrid_matching": {"model.hybrid_queries": 200},
    "no_mask_bce": {"loss.mask_bce_weight": 0.0},
    "no_varifocal": {"loss.class_loss": "focal"},
    "query_selection": {"model.query_selection": True},
    "no_refine_points": {"model.refine_points": False},
}
# The preset again with other seeds (the spread of a single run's AP).
SEEDS = {"seed_2": {"train.seed": 2}}


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
            "train_time_s": summary["train_time_s"], "wall_s": time.perf_counter() - start,
            "seconds_per_step": summary["train_time_s"] / max(summary["iteration"], 1)}


def _job(job: dict[str, Any]) -> dict[str, Any]:
    """One fresh training run (in this process or a worker process with ``job['threads']`` threads)."""
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    name = job["name"]

    def log(message: str) -> None:
        print(f"[{name}] {message}", flush=True)

    cfg = apply_overrides(get_preset("isda_tiny"), dict(job.get("overrides", {}))).validate()
    if job["model"] == "maskrcnn":
        kw = job["maskrcnn"]
        return train_maskrcnn(cfg, *job["data"]["train"], *job["data"]["val"], job["budget"], lr=kw["lr"],
                              optimizer=kw["optimizer"], roi_batch=kw["roi_batch"], log=log)
    return _isda_run(cfg, job["data"], Path(job["out_dir"]), job["budget"], log)


def run(out_root: Path, budgets_s: list[float], ablation_budget_s: float | None, num_train: int = 2000,
        num_val: int = 200, maskrcnn_lr: float | None = None, maskrcnn_optimizer: str = "adamw",
        maskrcnn_roi_batch: int | None = None, ablations: bool = True, levers: bool = True, jobs: int = 1,
        threads: int = 2, variants: list[str] | None = None, log=print) -> dict[str, Any]:
    """Each budget is a separate pair of fresh runs (ISDA, Mask R-CNN), so that both get their whole
    budget-following lr schedule; the ablations and the levers are fresh ISDA runs at ``ablation_budget_s``.
    ``variants``: only these of the ablation, lever and seed runs. ``jobs`` > 1 runs that many at once in separate processes, ``threads // jobs`` threads each (every run
    then gets the same share of the machine, and the comparison stays like for like)."""
    out_root = Path(out_root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = make_shapes_dataset(out_root / f"shapes_{num_train}_{num_val}", num_train=num_train, num_val=num_val,
                               image_size=128, seed=0)
    data = {k: [str(p) for p in v] for k, v in data.items()}
    cfg = get_preset("isda_tiny")
    t = cfg.train
    per_job_threads = max(1, threads // jobs)
    results: dict[str, Any] = {
        "budgets_s": sorted(budgets_s), "num_train": num_train, "num_val": num_val, "image_size": 128,
        "jobs": jobs, "threads_per_run": per_job_threads,
        "isda_preset": "isda_tiny", "isda_recipe": {"optimizer": "adamw", "lr": t.lr, "batch_size": t.batch_size,
                                                    "clip_max_norm": t.clip_max_norm, "weight_decay": t.weight_decay,
                                                    "num_queries": cfg.model.num_queries,
                                                    "num_detections": cfg.model.num_detections},
        "isda": {}, "maskrcnn": {}}
    maskrcnn = {"lr": maskrcnn_lr, "optimizer": maskrcnn_optimizer, "roi_batch": maskrcnn_roi_batch or ROI_BATCH}
    todo: list[tuple[tuple[str, str], dict[str, Any]]] = []
    for budget in sorted(budgets_s):
        key = str(int(budget))
        base = {"data": data, "budget": budget, "threads": per_job_threads}
        todo.append((("isda", key), {**base, "model": "isda", "name": f"isda {key}s",
                                     "out_dir": str(out_root / f"isda_{key}s_{stamp}")}))
        todo.append((("maskrcnn", key), {**base, "model": "maskrcnn", "name": f"maskrcnn {key}s",
                                         "maskrcnn": maskrcnn}))
    extra = {**(ABLATIONS if ablations else {}), **(LEVERS if levers else {}), **(SEEDS if levers else {})}
    if variants is not None:  # a subset of the ablation / lever / seed runs, by name
        extra = {name: overrides for name, overrides in extra.items() if name in variants}
    if extra and ablation_budget_s:
        results["ablation_budget_s"] = ablation_budget_s
        for name, overrides in extra.items():
            section = "ablations" if name in ABLATIONS else "levers" if name in LEVERS else "seeds"
            results.setdefault(section, {})
            todo.append(((section, name), {"data": data, "budget": ablation_budget_s, "threads": per_job_threads,
                                           "model": "isda", "name": name, "overrides": overrides,
                                           "out_dir": str(out_root / f"isda_{name}_{stamp}")}))
    log(f"  accuracy: {len(todo)} runs, {jobs} at a time, {per_job_threads} thread(s) each")
    if jobs == 1:
        finished = [(where, _job(job)) for where, job in todo]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [(where, pool.submit(_job, job)) for where, job in todo]
            finished = [(where, f.result()) for where, f in futures]
    for (section, key), res in finished:
        overrides = next(job.get("overrides") for w, job in todo if w == (section, key))
        results[section][key] = {**res, "overrides": overrides} if overrides else res
    return results
