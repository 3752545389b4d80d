"""Accuracy under the same CPU budget on the generated shapes dataset (full mode; long).

* ISDA tiny (``isda.engine.train`` with ``train.time_budget_s``; its preset recipe) against torchvision
  Mask R-CNN R18-FPN (:mod:`benchmarks.maskrcnn_shapes`), both from scratch on the same data, same
  augmentation and the same thread count; COCO mask AP (``isda.engine.evaluation.evaluate_masks``) of each at
  every budget (default 8 and 30 minutes of training time, evaluation excluded; one fresh run per
  budget and model, since both lr schedules follow the budget).
* Variants of ISDA tiny at each variant budget: the paper's two ablations in miniature (MP + KP vs neither,
  mask stride 8 vs 4 vs 2), issue 7's convergence levers one at a time, and the preset with another seed;
  the default they are compared with is the main ISDA run at the same budget.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
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
# Issue 7's convergence levers, each switched off (the preset's) or on (the others) alone.
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


def plan_variants(variants: list[str] | None, variant_budgets_s: list[float]) -> set[tuple[str, float]]:
    """The (variant, budget) runs that ``variants`` asks for (names, or ``name@seconds`` for one budget; None: all
    at every budget); ValueError naming the entry for an unknown name or a budget that is not a number."""
    names = {**ABLATIONS, **LEVERS, **SEEDS}
    runs: set[tuple[str, float]] = set()
    for entry in variants or names:
        name, _, at = entry.partition("@")
        if name not in names:
            raise ValueError(f"unknown variant {name!r} in --variants; choose from {', '.join(names)}")
        try:
            runs |= {(name, float(at))} if at else {(name, b) for b in variant_budgets_s}
        except ValueError:
            raise ValueError(f"--variants {entry!r}: the budget after @ must be seconds, e.g. {name}@1800") from None
    return runs


def run(out_root: Path, budgets_s: list[float], variant_budgets_s: list[float], num_train: int = 2000,
        num_val: int = 200, maskrcnn_lr: float | None = None, maskrcnn_optimizer: str = "adamw",
        maskrcnn_roi_batch: int | None = None, jobs: int = 1, threads: int = 2, variants: list[str] | None = None,
        previous: dict[str, Any] | None = None, save: Callable[[dict[str, Any]], None] | None = None,
        log=print) -> dict[str, Any]:
    """Each budget in ``budgets_s`` is a separate pair of fresh runs (ISDA, Mask R-CNN), so that both get their
    whole budget-following lr schedule; the ablation, lever and seed runs are fresh ISDA runs at each of
    ``variant_budgets_s`` (``variants``: only these, by name; ``name@seconds``: that one at that budget only). ``jobs`` > 1 runs that many at once in
    separate processes, ``threads // jobs`` threads each (every run then gets the same share of the machine,
    and the comparison stays like for like). The results are merged into ``previous`` (an earlier
    invocation's, kept where this one does not re-run them) when both measured the same thing
    (:func:`merge`); ``save`` gets the merged results after every finished run, so that a long invocation
    that is stopped keeps what it finished."""
    extra = {**ABLATIONS, **LEVERS, **SEEDS}
    variant_runs = plan_variants(variants, variant_budgets_s)
    out_root = Path(out_root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = make_shapes_dataset(out_root / f"shapes_{num_train}_{num_val}", num_train=num_train, num_val=num_val,
                               image_size=128, seed=0)
    data = {k: [str(p) for p in v] for k, v in data.items()}
    cfg = get_preset("isda_tiny")
    t = cfg.train
    per_job_threads = max(1, threads // jobs)
    maskrcnn = {"lr": maskrcnn_lr, "optimizer": maskrcnn_optimizer, "roi_batch": maskrcnn_roi_batch or ROI_BATCH}
    results: dict[str, Any] = {
        "budgets_s": sorted(budgets_s), "variant_budgets_s": sorted({b for _, b in variant_runs}), "num_train": num_train,
        "num_val": num_val, "image_size": 128, "jobs": jobs, "threads_per_run": per_job_threads,
        "isda_preset": "isda_tiny", "isda_recipe": {"optimizer": "adamw", "lr": t.lr, "batch_size": t.batch_size,
                                                    "clip_max_norm": t.clip_max_norm, "weight_decay": t.weight_decay,
                                                    "num_queries": cfg.model.num_queries,
                                                    "num_detections": cfg.model.num_detections},
        "isda_config": json.loads(json.dumps(dataclasses.asdict(cfg))), "maskrcnn_settings": maskrcnn,
        "isda": {}, "maskrcnn": {}}
    todo: list[tuple[tuple[str, str, str], dict[str, Any]]] = []
    for budget in sorted(budgets_s):
        key = str(int(budget))
        base = {"data": data, "budget": budget, "threads": per_job_threads}
        todo.append((("isda", key, ""), {**base, "model": "isda", "name": f"isda {key}s",
                                         "out_dir": str(out_root / f"isda_{key}s_{stamp}")}))
        todo.append((("maskrcnn", key, ""), {**base, "model": "maskrcnn", "name": f"maskrcnn {key}s",
                                             "maskrcnn": maskrcnn}))
    names = list(extra)  # the longest first (the shorter ones fill in beside them), then in the table's order
    for name, budget in sorted(variant_runs, key=lambda run: (-run[1], names.index(run[0]))):
        key = str(int(budget))
        section = "ablations" if name in ABLATIONS else "levers" if name in LEVERS else "seeds"
        todo.append(((section, name, key), {"data": data, "budget": budget, "threads": per_job_threads,
                                            "model": "isda", "name": f"{name} {key}s", "overrides": extra[name],
                                            "out_dir": str(out_root / f"isda_{name}_{key}s_{stamp}")}))
    results = merge(previous, results)

    def record(where: tuple[str, str, str], job: dict[str, Any], res: dict[str, Any]) -> None:
        section, name, key = where
        if section in ("isda", "maskrcnn"):
            results[section][name] = res
        else:
            entry = results.setdefault(section, {}).setdefault(name, {"overrides": job["overrides"], "runs": {}})
            entry["overrides"] = job["overrides"]
            entry["runs"][key] = res
        if save is not None:
            save(results)

    log(f"  accuracy: {len(todo)} runs, {jobs} at a time, {per_job_threads} thread(s) each")
    if jobs == 1:
        for where, job in todo:
            record(where, job, _job(job))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_job, job): (where, job) for where, job in todo}
            for future in as_completed(futures):
                record(*futures[future], future.result())
    return results


# What two invocations must share for their results to sit in one table.
_SAME = ("num_train", "num_val", "image_size", "threads_per_run", "isda_preset", "isda_recipe", "isda_config",
         "maskrcnn_settings")


def merge(previous: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with the runs of ``previous`` that it does not re-run, when both measured the same thing (same
    dataset, thread share, ISDA preset configuration and Mask R-CNN settings; a field that only one of them
    recorded is not compared); otherwise ``new`` alone."""
    old_format = any("runs" not in e for sec in ("ablations", "levers", "seeds") for e in (previous or {}).get(sec, {}).values())
    if not previous or old_format or any(k in previous and k in new and previous[k] != new[k] for k in _SAME):
        return new
    merged = {**{k: v for k, v in previous.items() if k != "_meta"},
              **{k: v for k, v in new.items() if k not in ("isda", "maskrcnn")}}
    merged["earlier"] = previous.get("earlier", []) + ([previous["_meta"]] if "_meta" in previous else [])
    for section in ("isda", "maskrcnn"):
        merged[section] = {**previous.get(section, {}), **new.get(section, {})}
    for key in ("budgets_s", "variant_budgets_s"):
        merged[key] = sorted(set(previous.get(key, [])) | set(new.get(key, [])))
    for section in ("ablations", "levers", "seeds"):
        for name, entry in new.get(section, {}).items():
            old = previous.get(section, {}).get(name, {})
            merged.setdefault(section, {})[name] = {**entry, "runs": {**old.get("runs", {}), **entry["runs"]}}
    return merged
