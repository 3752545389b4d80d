"""Accuracy under the same CPU budget on generated data (full mode; long).

ISDA tiny (``isda.engine.train`` with ``train.time_budget_s``) against torchvision Mask R-CNN R18-FPN
(:mod:`benchmarks.maskrcnn_shapes`), both from scratch on the same data, augmentation and thread count; COCO mask
AP (``isda.engine.evaluation.evaluate_masks``). Splits of the shapes dataset: train (2,000 images), tune (the
generator's val split, seed 0: every recipe choice is made on it) and test (another 200 images, seed 1: only
the reported tables). Parts (``parts``):

* ``sweep``: the same tuning effort for both models at ``sweep_budget_s`` on tune: Mask R-CNN's optimiser (AdamW,
  SGD + momentum) x three lrs, its widths (FPN / heads), batch and RoI sampling; ISDA's lr x {0.5, 1, 2}. The best
  tune AP of each model is its recipe for the other parts (:func:`chosen`).
* ``test``: each budget (default 8 and 30 minutes of training time, evaluation excluded) x each seed, one
  fresh run per model (both lr schedules follow the budget), on test.
* ``heldout``: the second generated family (:mod:`benchmarks.heldout_shapes`), never used for tuning: each
  held-out budget x each seed, both models with their chosen recipes side by side (ISDA with ``data.fit_sizes``
  off, the preset's fixed input size), then ISDA with ``data.fit_sizes`` on at each seed.
* ``variants``: ISDA tiny's ablations and convergence levers at each variant budget on test; the default they
  are compared with is the main ISDA run (seed 0) at the same budget.
* ``tune_levers``: the choice of ISDA tiny's levers, on tune: the chosen recipe alone and with each lever (or the
  ``--variants`` given), at each variant budget and variant seed. The rule, fixed before the runs
  (:func:`benchmarks.derived.lever_choice`): the best mean tune AP over the seeds at the first variant budget; an
  entry within the seed noise of the best and cheaper (more steps) wins the tie.
* ``tune_speedups``: the generic speed-ups (:data:`SPEEDUPS`) for both models, on tune: each model's recipe alone
  and with each speed-up, at each variant budget and variant seed, the two models side by side. A speed-up that
  keeps each model's tune AP (the same rule as the levers', per model) is given to both.
* ``heldout_levers``: the same comparison on the held-out family (the levers given in ``--variants``, as the preset
  runs there: ``data.fit_sizes`` off), at each variant budget and variant seed: a lever chosen on tune becomes a
  default only if it does not lose here.

The sweep and the lever choice decide the preset's defaults; once a winner becomes a default, the preset changes and
ISDA's earlier runs cannot be merged with new ones (:func:`merge`; Mask R-CNN's can). The runs behind the choice are
then kept as a record of it: a section of ``benchmarks.json`` whose ``_meta.decided`` names the values it chose
(``choice``, ``choice_locality``; :func:`benchmarks.derived.choice_records`), on the configuration it records; the
recipes of a section without a sweep come from the latest record with one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from isda.config import apply_overrides, get_preset
from isda.data import make_shapes_dataset

from .common import cpu_model
from .derived import PROBE_S
from .heldout_shapes import make_heldout_dataset
from .maskrcnn_shapes import ROI_BATCH, WARMUP_FRAC, train_maskrcnn
from .quiet import measured

PARTS = ("sweep", "test", "heldout", "variants", "tune_levers", "heldout_levers", "tune_speedups")
MODELS = ("isda", "maskrcnn")
SWEEP_BUDGET_S = 180.0
# The Mask R-CNN sweep's centre (width 64: about ISDA tiny's cost per step at one thread) and the recipe used when
# no sweep was run; each sweep entry changes one or two of these.
MASKRCNN_BASE: dict[str, Any] = {"optimizer": "adamw", "lr": 2e-4, "width": 64, "roi_batch": ROI_BATCH,
                                 "batch_size": 8}
MASKRCNN_SWEEP: dict[str, dict[str, Any]] = {
    "adamw lr 1e-4": {"lr": 1e-4}, "adamw lr 2e-4": {}, "adamw lr 4e-4": {"lr": 4e-4},
    "sgd lr 0.005": {"optimizer": "sgd", "lr": 0.005}, "sgd lr 0.01": {"optimizer": "sgd", "lr": 0.01}, "sgd lr 0.02": {"optimizer": "sgd", "lr": 0.02},
    "sgd lr 0.04": {"optimizer": "sgd", "lr": 0.04},
    "width 128": {"width": 128}, "width 256 (torchvision's)": {"width": 256},
    "batch 4": {"batch_size": 4}, "64 RoIs per image": {"roi_batch": 64},
    # The first sweep's best entries sat at its edges (the highest AdamW lr, the smaller batch): one step further.
    "batch 4 adamw lr 4e-4": {"batch_size": 4, "lr": 4e-4}, "batch 4 adamw lr 8e-4": {"batch_size": 4, "lr": 8e-4},
    "sgd lr 0.02 clip 1": {"optimizer": "sgd", "lr": 0.02, "clip_max_norm": 1.0},
    # ... and again where the best was still at an edge (the highest lr at batch 4; the smallest batch).
    "batch 4 adamw lr 1.6e-3": {"batch_size": 4, "lr": 1.6e-3}, "batch 2 adamw lr 8e-4": {"batch_size": 2, "lr": 8e-4},
}
ISDA_SWEEP: dict[str, dict[str, Any]] = {
    "lr x0.5": {"train.lr": 1e-4}, "lr x1 preset": {}, "lr x2": {"train.lr": 4e-4},
    # As for Mask R-CNN: one step past the edges (lr x2 was the highest tried; Mask R-CNN won with batch 4).
    "lr x4": {"train.lr": 8e-4}, "batch 4 lr x2": {"train.batch_size": 4, "train.lr": 4e-4},
    "batch 4 lr x4": {"train.batch_size": 4, "train.lr": 8e-4},
    "batch 2 lr x1": {"train.batch_size": 2, "train.lr": 2e-4}, "batch 2 lr x2": {"train.batch_size": 2, "train.lr": 4e-4},
}
SEEDS = (0, 1)
HELDOUT_ISDA = {"isda": {"data.fit_sizes": True}, "isda_no_fit": {"data.fit_sizes": False}}
# Mask R-CNN at the preset's fixed input size everywhere (as its runs were made): on the held-out family it stands
# beside ISDA's fixed-size runs. ``maskrcnn_fit`` gives it the sizes data.fit_sizes picks (the same crops to train,
# whole images at the fitted scale to test: a CNN needs no windows), so ISDA's default meets it at the same scale.
MASKRCNN_DATA = {"data.fit_sizes": False}
HELDOUT_MASKRCNN = {"maskrcnn": MASKRCNN_DATA, "maskrcnn_fit": {"data.fit_sizes": True}}
# Validate once, at the end: intermediate validations cost wall time and no choice uses them.
RUN_OVERRIDES = {"train.evals_per_run": 1}

ABLATIONS = {
    "no_mp_no_kp": {"model.mask_position": False, "model.kernel_position": False},
    "mask_stride_8": {"model.mask_stride": 8},
    "mask_stride_4": {"model.mask_stride": 4},  # the paper's stride (isda_tiny's is 2)
    "mask_stride_2": {"model.mask_stride": 2},  # the records' name; equals isda_tiny now
}
# Convergence levers, each switched off (the preset's) or on (the others) alone.
LEVERS = {
    "hybrid_matching": {"model.hybrid_queries": 200},
    "no_mask_bce": {"loss.mask_bce_weight": 0.0},
    "no_varifocal": {"loss.class_loss": "focal"},
    "query_selection": {"model.query_selection": True},
    "no_refine_points": {"model.refine_points": False},
    # Won on tune and is now isda_tiny's default: "denoising" (the records' name) equals the recipe; the preset before
    # the choice is "no_denoising".
    "denoising": {"model.denoising_groups": 5},
    "no_denoising": {"model.denoising_groups": 0},
    # DINO's contrastive denoising on top: a farther copy of every instance per group, trained as background.
    "contrastive_denoising": {"model.denoising_negatives": True},
    "mask_class": {"model.mask_class": True},
    # Masks that can leave out an object of their class elsewhere: -a d^2 around the query's point.
    "mask_locality": {"model.mask_locality": True},
    "denoising_mask_stride_2": {"model.denoising_groups": 5, "model.mask_stride": 2},
    "o2m_matching": {"loss.o2m_topk": 3},
    # The preset's one-to-many matching with more positives per object (denser early supervision).
    "o2m_5": {"loss.o2m_topk": 5},
    "quality_matching": {"loss.match_quality": 0.5},
    "look_forward_twice": {"model.look_forward_twice": True},
    "dense_aux": {"model.dense_aux": True},
    # Finer masks for small objects: the losses at the input's resolution, or the mask features at stride 2 (the
    # paper's stride ablation, here as a lever chosen on tune).
    "fine_mask_loss": {"loss.mask_loss_upsample": 4},
    # The same on 1024 points per mask (PointRend's sampling): the finer target at the stride's cost per mask.
    "fine_mask_points": {"loss.mask_loss_upsample": 4, "loss.mask_loss_points": 1024},
    # Stride 2 won on tune and is now isda_tiny's default: "finer_mask_stride" (the records' name) equals the recipe;
    # the ablation "mask_stride_4" is the preset before the choice.
    "finer_mask_stride": {"model.mask_stride": 2},
    # The combination of the levers that beat the recipe beyond the seed noise alone on tune (8 minutes).
    "o2m_denoising": {"loss.o2m_topk": 3, "model.denoising_groups": 5},
    # The preset's sizes, as Mask R-CNN's widths were swept: transformer width (its FFN at 4x), decoder depth,
    # queries. A step costs (one thread, bf16): width 256 1.4x, width 64 0.9x, 6 decoder layers 1.3x, 50 queries 0.95x.
    "width_256": {"model.hidden_dim": 256, "model.ffn_dim": 1024},
    "width_64": {"model.hidden_dim": 64, "model.ffn_dim": 256},
    "decoder_6": {"model.dec_layers": 6},
    # 50 won on tune and is now isda_tiny's default: "queries_50" (the records' name) equals the recipe, and
    # "queries_100" is the preset before the choice.
    "queries_100": {"model.num_queries": 100},
    "queries_50": {"model.num_queries": 50},
    "queries_25": {"model.num_queries": 25},  # one step past the edge, as the sweep does
    # The lr was swept at 3 minutes on an earlier preset (stride 4, 100 queries, one-to-one matching): again at
    # 8 minutes on the current one, one and two steps up (Mask R-CNN's bf16 recipe runs at 1e-3).
    "lr_6e-4": {"train.lr": 6e-4},
    "lr_8e-4": {"train.lr": 8e-4},
    # The same with the Mask R-CNN baseline's warm-up (linear over the first 5 % of the budget): a higher lr may
    # need one.
    "warmup_lr_6e-4": {"train.lr": 6e-4, "train.warmup_frac": WARMUP_FRAC},
    "warmup_lr_8e-4": {"train.lr": 8e-4, "train.warmup_frac": WARMUP_FRAC},
    "warmup_lr_1e-3": {"train.lr": 1e-3, "train.warmup_frac": WARMUP_FRAC},  # one step past the edge
    # A nonlinear per-query mask head beside the linear kernel (CondInst's dynamic head: 8 hidden channels there).
    # A step costs (as above) 1.4x with 8, 1.2x with 4.
    "mask_mlp_8": {"model.mask_mlp_hidden": 8},
    "mask_mlp_4": {"model.mask_mlp_hidden": 4},
}
EMA_DECAY = 0.999  # the "ema" aid's decay, fixed before its runs
# Generic aids, not ISDA's learning levers: what either model can use alike (more steps in the same minutes, or a
# better use of the same steps). Each: (ISDA's config overrides, Mask R-CNN's train_maskrcnn settings).
SPEEDUPS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # CPU autocast to bfloat16 (AMX / AVX512-BF16 matrix units), training and evaluation alike.
    "bf16": ({"train.amp": "bf16"}, {"amp": "bf16"}),
    # Evaluate the weights' exponential moving average (isda.engine.ema; its ramp decides in a run this short).
    "ema": ({"train.ema_decay": EMA_DECAY}, {"ema_decay": EMA_DECAY}),
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
    return {"ap": summary["val"], "ap_class_agnostic": _class_agnostic(data["val"][0], out_dir / "results_val.json"),
            "iterations": summary["iteration"], "epochs": summary["epoch"],
            "train_time_s": summary["train_time_s"], "wall_s": time.perf_counter() - start,
            "seconds_per_step": summary["train_time_s"] / max(summary["iteration"], 1),
            "lr": c.train.lr, "seed": c.train.seed,
            # the size the trainer chose (data.fit_sizes), as saved with the run
            "input_short_side": yaml.safe_load((out_dir / "config.yaml").read_text())["data"]["test_short_side"]}


def _coco(ann_file: str):
    import contextlib
    import io

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        return COCO(ann_file)


def _class_agnostic(ann_file: str, results_file: Path) -> dict[str, float]:
    """The class-agnostic mask AP of a run's final validation results (what wrong labels cost)."""
    from isda.engine.evaluation import evaluate_masks

    return evaluate_masks(_coco(ann_file), json.loads(results_file.read_text()), class_agnostic=True).stats


def _job(job: dict[str, Any]) -> dict[str, Any]:
    """One fresh training run (in this process or a worker process with ``job['threads']`` threads); the result
    carries its settings and the load average around it (the machine is shared)."""
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    name = job["name"]

    def log(message: str) -> None:
        print(f"[{name}] {message}", flush=True)

    load_before = os.getloadavg()[0]
    cfg = apply_overrides(get_preset("isda_tiny"), {**RUN_OVERRIDES, **job.get("overrides", {})}).validate()
    if job["model"] == "maskrcnn":
        res = train_maskrcnn(cfg, *job["data"]["train"], *job["data"]["val"], job["budget"], log=log,
                             **job["maskrcnn"])
    else:
        res = _isda_run(cfg, job["data"], Path(job["out_dir"]), job["budget"], log)
        res["overrides"] = job.get("overrides", {})
    res["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    res["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    res["cpu"] = cpu_model()  # invocations merged into one page may come from different machines
    return res


def chosen(sweep: dict[str, Any] | None, recorded: bool = False) -> dict[str, Any]:
    """Each model's recipe: the sweep entry with the best tune AP (Mask R-CNN: its settings; ISDA: its config
    overrides), or the defaults (MASKRCNN_BASE, the preset) for a model the sweep did not run. ``recorded``: the
    sweep comes from a record of a choice, not this invocation: its ISDA winner is in the preset by now (the record
    decided it, or a later record decided over it), so ISDA's recipe is the preset."""
    out: dict[str, Any] = {"maskrcnn": dict(MASKRCNN_BASE), "isda": {}, "from_sweep": []}
    for model in ("maskrcnn",) if recorded else ("maskrcnn", "isda"):
        done = {n: e for n, e in (sweep or {}).get(model, {}).items() if e.get("result", {}).get("ap")}
        if done:
            best = max(done, key=lambda n: done[n]["result"]["ap"]["AP"])
            out[model] = dict(done[best]["settings"])
            out["from_sweep"].append(f"{model}: {best}")
    return out


def plan_variants(variants: list[str] | None, variant_budgets_s: list[float]) -> set[tuple[str, float]]:
    """The (variant, budget) runs that ``variants`` asks for (names, or ``name@seconds`` for one budget; None: all
    at every budget); ValueError naming the entry for an unknown name or a budget that is not a number."""
    names = {**ABLATIONS, **LEVERS}
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


def _run_all(todo: list[tuple[tuple[str, ...], dict[str, Any]]], jobs: int, record, settle: bool = True) -> None:
    """Run the jobs in groups of ``jobs`` neighbours in ``todo``, side by side in separate processes (in this
    process when ``jobs`` is 1), calling ``record(where, job, result)`` as each group finishes. A group starts on
    a settled machine (``settle``: :func:`benchmarks.quiet.measured`) and its results carry the group's
    ``quiet`` record: the load average before and after and the CPUs other work used beside it (a budgeted run's
    steps are a timing)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    for i in range(0, len(todo), jobs):
        group = todo[i : i + jobs]
        with measured(settle_first=settle, log=print) as quiet:
            if jobs == 1:
                results = [_job(job) for _, job in group]
            else:  # a pool per group: its workers have exited (their CPU time counted as ours) when it ends
                with ProcessPoolExecutor(len(group), mp_context=multiprocessing.get_context("spawn")) as pool:
                    results = list(pool.map(_job, [job for _, job in group]))
        for (where, job), res in zip(group, results):
            record(where, job, {**res, "quiet": quiet})


def datasets(out_root: Path, num_train: int, num_val: int, heldout: bool) -> dict[str, dict[str, list[str]]]:
    """``{"tune": {"train", "val"}, "test": {...}[, "heldout": {...}]}``: the shapes train split with the tune split
    (the generator's val split, seed 0) or the test split (200 fresh images: the val split of seed 1) as "val";
    the held-out family's train and test splits."""
    shapes = make_shapes_dataset(out_root / f"shapes_{num_train}_{num_val}", num_train=num_train, num_val=num_val,
                                 image_size=128, seed=0)
    test = make_shapes_dataset(out_root / f"shapes_test_{num_val}_seed1", num_train=0, num_val=num_val,
                               image_size=128, seed=1)["val"]
    out = {"tune": {"train": shapes["train"], "val": shapes["val"]}, "test": {"train": shapes["train"], "val": test}}
    if heldout:
        h = make_heldout_dataset(out_root / f"heldout_{num_train}_{num_val}", num_train=num_train, num_test=num_val)
        out["heldout"] = {"train": h["train"], "val": h["test"]}
    return {k: {s: [str(p) for p in v] for s, v in d.items()} for k, d in out.items()}


def _stats(ann_file: str) -> dict[str, Any]:
    """What the preset's fixed 128 px input makes of a training set's instances (isda.data.sizing)."""
    from isda.data.sizing import dataset_stats, fit_sizes

    st = dataset_stats(_coco(ann_file))
    data = get_preset("isda_tiny").data
    # What data.fit_sizes=true would choose (the preset has it off: fitted unchanged otherwise).
    fitted, _ = fit_sizes(dataclasses.replace(data, fit_sizes=True), st, get_preset("isda_tiny").model.num_queries)
    return {"images": st.num_images, "instances_per_image": st.num_instances / max(st.num_images, 1),
            "median_instance_px": st.median_instance_px, "max_instances": st.max_instances,
            "image_short_side": st.median_short_side,
            "instance_px_at_preset_size": st.instance_px_at(data.test_short_side, data.test_max_size),
            "fitted_short_side": fitted.test_short_side,
            "instance_px_fitted": st.instance_px_at(fitted.test_short_side, fitted.test_max_size)}


def run(out_root: Path, budgets_s: list[float], variant_budgets_s: list[float], num_train: int = 2000,
        num_val: int = 200, parts: tuple[str, ...] = PARTS, sweep_budget_s: float = SWEEP_BUDGET_S,
        heldout_budgets_s: list[float] | None = None, seeds: tuple[int, ...] = SEEDS,
        sweep_entries: list[str] | None = None, jobs: int = 1, threads: int = 2,
        variants: list[str] | None = None, variant_seeds: tuple[int, ...] = (0,), previous: dict[str, Any] | None = None,
        choice: dict[str, Any] | None = None, save: Callable[[dict[str, Any]], None] | None = None,
        speedups: tuple[str, ...] = (), heldout_fit: bool = True, heldout_fixed: bool = True,
        heldout_maskrcnn: tuple[str, ...] = ("maskrcnn",), models: tuple[str, ...] = MODELS, settle: bool = True,
        probe_s: float | None = None, log=print) -> dict[str, Any]:
    """The ``parts`` (see the module doc), in that order; the sweep finishes before the rest starts, since its
    winners are the recipes of the rest. ``jobs`` > 1 runs that many at once in separate processes,
    ``threads // jobs`` threads each; the runs are ordered so that ISDA and Mask R-CNN with the same budget and
    seed run side by side (the machine's other load hits both alike). Results are merged into ``previous``
    (:func:`merge`); ``save`` gets them after every finished run, so that a stopped invocation keeps what it
    finished. ``sweep_entries``: only these sweep entries (e.g. to re-run those a busy machine slowed down; the
    others are kept from ``previous``). ``variant_seeds``: each variant run at these seeds (seed 0 under
    ``runs``, the others under ``seeds``), neighbours side by side. ``choice``: the section that recorded the sweep
    behind the preset's defaults, for the recipes when neither this invocation nor ``previous`` ran one.
    ``speedups``: names of :data:`SPEEDUPS` given to both models in every run after the sweep (each run records its
    settings). ``heldout_fit``: the held-out part also runs ISDA with ``data.fit_sizes`` (after the pairs);
    ``heldout_fixed``: it runs ISDA at the fixed input (``data.fit_sizes`` off) beside Mask R-CNN (without it, Mask
    R-CNN's runs pair with the fitted ones); ``heldout_maskrcnn``: which of :data:`HELDOUT_MASKRCNN` the held-out
    part trains (``maskrcnn_fit`` pairs with ISDA's fitted runs, seed by seed).
    ``models``: the test and held-out parts train these (e.g. ISDA alone after its preset changed: Mask R-CNN's
    runs are kept from ``previous``, see :func:`merge`). ``settle``: each group of side-by-side runs waits for the
    load average to settle first (off only where nothing is timed, as in the plumbing tests). ``probe_s``: the
    training seconds of the speed probe (default :data:`PROBE_S`) whose rates every run after the sweep records as
    ``speed_probe``; 0: none."""
    if set(models) - set(MODELS) or not models:
        raise ValueError(f"models: choose from {', '.join(MODELS)}, not {', '.join(models) or 'none'}")
    if set(heldout_maskrcnn) - set(HELDOUT_MASKRCNN):
        raise ValueError(f"heldout_maskrcnn: choose from {', '.join(HELDOUT_MASKRCNN)}, not {', '.join(heldout_maskrcnn)}")
    heldout_budgets_s = list(budgets_s[:1] if heldout_budgets_s is None else heldout_budgets_s)
    variant_runs = plan_variants(variants, variant_budgets_s) if "variants" in parts else set()
    tune_runs = plan_variants(variants or list(LEVERS), variant_budgets_s) if "tune_levers" in parts else set()
    heldout_lever_runs = (plan_variants(variants or list(LEVERS), variant_budgets_s) if "heldout_levers" in parts
                          else set())
    if any(name not in LEVERS for name, _ in tune_runs | heldout_lever_runs):
        raise ValueError(f"tune_levers, heldout_levers: only levers ({', '.join(LEVERS)}) are compared, not ablations")
    out_root = Path(out_root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = datasets(out_root, num_train, num_val,
                    ("heldout" in parts and bool(heldout_budgets_s)) or bool(heldout_lever_runs))
    cfg = get_preset("isda_tiny")
    t = cfg.train
    per_job_threads = max(1, threads // jobs)
    results: dict[str, Any] = {
        "budgets_s": sorted(budgets_s) if "test" in parts else [], "seeds": list(seeds),
        "variant_budgets_s": sorted({b for _, b in variant_runs | tune_runs | heldout_lever_runs}),
        "sweep_budget_s": sweep_budget_s,
        "heldout_budgets_s": sorted(heldout_budgets_s) if "heldout" in parts else [],
        "num_train": num_train, "num_val": num_val, "image_size": 128, "jobs": jobs,
        "threads_per_run": per_job_threads, "isda_preset": "isda_tiny",
        "isda_recipe": {"optimizer": "adamw", "lr": t.lr, "batch_size": t.batch_size, "clip_max_norm": t.clip_max_norm,
                        "weight_decay": t.weight_decay, "num_queries": cfg.model.num_queries,
                        "num_detections": cfg.model.num_detections},
        "isda_config": json.loads(json.dumps(dataclasses.asdict(cfg))), "isda": {}, "maskrcnn": {}}
    results["data_stats"] = {name: _stats(d["train"][0]) for name, d in data.items() if name != "tune"}
    results = merge(previous, results)

    probe: dict[str, Any] = {}  # this invocation's speed probe, once it ran

    def record(where: tuple[str, ...], job: dict[str, Any], res: dict[str, Any]) -> None:
        node = results
        for key in where[:-1]:
            node = node.setdefault(key, {})
        if where[0] == "sweep":  # a re-run keeps the results it replaces (e.g. slowed by a busy machine)
            old = node.get(where[-1]) or {}
            res = {"settings": job.get("maskrcnn") or job.get("overrides", {}), "result": res,
                   "replaced": old.get("replaced", []) + ([old["result"]] if "result" in old else [])}
        if probe and where[0] != "sweep":
            res = {**res, "speed_probe": probe}
        node[where[-1]] = res
        if save is not None:
            save(results)

    def isda_job(name: str, split: str, budget: float, overrides: dict[str, Any], seed: int = 0) -> dict[str, Any]:
        return {"data": data[split], "budget": budget, "threads": per_job_threads, "model": "isda", "name": name,
                "overrides": {**overrides, **({"train.seed": seed} if seed else {})},
                "out_dir": str(out_root / f"isda_{name.replace(' ', '_')}_{stamp}")}

    def maskrcnn_job(name: str, split: str, budget: float, settings: dict[str, Any], seed: int = 0,
                     overrides: dict[str, Any] = MASKRCNN_DATA) -> dict[str, Any]:
        return {"data": data[split], "budget": budget, "threads": per_job_threads, "model": "maskrcnn", "name": name,
                "maskrcnn": {**settings, "seed": seed}, "overrides": overrides}

    if "sweep" in parts:
        mrcnn = [(("sweep", "maskrcnn", n), maskrcnn_job(f"sweep maskrcnn {n}", "tune", sweep_budget_s,
                                                         {**MASKRCNN_BASE, **change}))
                 for n, change in MASKRCNN_SWEEP.items()]
        isda = [(("sweep", "isda", n), isda_job(f"sweep isda {n}", "tune", sweep_budget_s, o))
                for n, o in ISDA_SWEEP.items()]
        if sweep_entries is not None:
            unknown = set(sweep_entries) - set(MASKRCNN_SWEEP) - set(ISDA_SWEEP)
            if unknown:
                raise ValueError(f"unknown sweep entries {sorted(unknown)}")
            mrcnn = [j for j in mrcnn if j[0][2] in sweep_entries]
            isda = [j for j in isda if j[0][2] in sweep_entries]
        # Each ISDA run beside a Mask R-CNN run, the rest after them.
        todo = [j for pair in zip(isda, mrcnn) for j in pair] + mrcnn[len(isda):] + isda[len(mrcnn):]
        log(f"  accuracy sweep: {len(todo)} runs of {sweep_budget_s:.0f} s on the tune split, {jobs} at a time")
        _run_all(todo, jobs, record, settle)
    results["chosen"] = chosen(results.get("sweep") or (choice or {}).get("sweep"), recorded=not results.get("sweep"))
    recipe = {model: {**results["chosen"][model], **{k: v for n in speedups for k, v in SPEEDUPS[n][i].items()}}
              for i, model in enumerate(("isda", "maskrcnn"))}
    todo = []
    if "test" in parts:
        for budget in sorted(budgets_s):
            for seed in seeds:
                key, s = str(int(budget)), str(seed)
                todo += [(("isda", key, s), isda_job(f"isda {key}s seed {s}", "test", budget, recipe["isda"], seed))
                         ] if "isda" in models else []
                todo += [(("maskrcnn", key, s), maskrcnn_job(f"maskrcnn {key}s seed {s}", "test", budget,
                                                             recipe["maskrcnn"], seed))] if "maskrcnn" in models else []
    for budget in sorted(heldout_budgets_s) if "heldout" in parts else []:
        key = str(int(budget))
        # Side by side: Mask R-CNN beside ISDA at the fixed 128 px input (the same input), or beside ISDA's default
        # (data.fit_sizes on) without the fixed runs; the fitted runs after the pairs otherwise.
        fitted = [(("heldout", key, "isda", str(seed)), isda_job(
            f"heldout isda {key}s seed {seed}", "heldout", budget, {**recipe["isda"], **HELDOUT_ISDA["isda"]}, seed))
            for seed in seeds if heldout_fit and "isda" in models]
        mr = {name: [(("heldout", key, name, str(seed)), maskrcnn_job(
            f"heldout {name} {key}s seed {seed}", "heldout", budget, recipe["maskrcnn"], seed, overrides))
            for seed in seeds] if "maskrcnn" in models and name in heldout_maskrcnn else []
            for name, overrides in HELDOUT_MASKRCNN.items()}
        fixed = [(("heldout", key, "isda_no_fit", str(seed)), isda_job(
            f"heldout isda_no_fit {key}s seed {seed}", "heldout", budget,
            {**recipe["isda"], **HELDOUT_ISDA["isda_no_fit"]}, seed)) for seed in seeds if "isda" in models]
        # Pairs at the same input: the fixed ones, then the fitted; without fixed ISDA runs, ISDA's default beside
        # Mask R-CNN at the fitted sizes if that runs, else at the fixed one.
        groups = ([(fixed, mr["maskrcnn"]), (fitted, mr["maskrcnn_fit"])] if heldout_fixed else
                  [(fitted, mr["maskrcnn_fit"]), ([], mr["maskrcnn"])] if mr["maskrcnn_fit"] else
                  [(fitted, mr["maskrcnn"])])
        todo += [j for a, b in groups for i in range(len(seeds)) for j in a[i:i + 1] + b[i:i + 1]]
    names = [*ABLATIONS, *LEVERS]  # the longest first (the shorter ones fill in beside them), then in table order
    for name, budget in sorted(variant_runs, key=lambda run: (-run[1], names.index(run[0]))):
        key = str(int(budget))
        section = "ablations" if name in ABLATIONS else "levers"
        overrides = {**ABLATIONS, **LEVERS}[name]
        results.setdefault(section, {}).setdefault(name, {"runs": {}})["overrides"] = overrides
        for seed in variant_seeds:
            where = (section, name, "runs", key) if seed == 0 else (section, name, "seeds", str(seed), key)
            todo.append((where, isda_job(f"{name} {key}s" + (f" seed {seed}" if seed else ""), "test", budget,
                                         {**recipe["isda"], **overrides}, seed)))
    # The recipe alone and with each lever, on tune (the choice) and on the held-out family (the check).
    # With speed-ups every entry has them: another comparison than one without, kept in its own section.
    suffix = "".join(f"+{n}" for n in speedups)
    for section, split, runs, base in ((f"tune_levers{suffix}", "tune", tune_runs, {}),
                                       (f"heldout_levers{suffix}", "heldout", heldout_lever_runs,
                                        HELDOUT_ISDA["isda_no_fit"])):
        for budget in sorted({b for _, b in runs}):
            key = str(int(budget))
            for name in ["recipe", *[n for n in LEVERS if (n, budget) in runs]]:
                overrides = LEVERS.get(name, {})
                results.setdefault(section, {}).setdefault(name, {"runs": {}})["overrides"] = overrides
                for seed in variant_seeds:
                    todo.append(((section, name, "runs", key, str(seed)), isda_job(
                        f"{split} {name} {key}s seed {seed}", split, budget, {**recipe["isda"], **base, **overrides},
                        seed)))
    # Each model's recipe alone and with each generic speed-up it does not have yet, on tune; ISDA beside Mask
    # R-CNN. On a recipe with ``speedups`` the comparison is another one, kept in its own section.
    others = {name: change for name, change in SPEEDUPS.items() if name not in speedups}
    for budget in sorted(variant_budgets_s) if "tune_speedups" in parts else []:
        key = str(int(budget))
        for name, (isda_overrides, maskrcnn_settings) in {"recipe": ({}, {}), **others}.items():
            for seed in variant_seeds:
                s = str(seed)
                for model, change in (("isda", isda_overrides), ("maskrcnn", maskrcnn_settings)):
                    entry = results.setdefault(f"tune_speedups{suffix}", {}).setdefault(model, {}).setdefault(
                        name, {"runs": {}})
                    entry["overrides"] = change
                    label = f"tune {model} {name} {key}s seed {s}"
                    todo.append(((f"tune_speedups{suffix}", model, name, "runs", key, s),
                                 isda_job(label, "tune", budget, {**recipe["isda"], **change}, seed) if model == "isda"
                                 else maskrcnn_job(label, "tune", budget, {**recipe["maskrcnn"], **change}, seed)))
    probe_s = PROBE_S if probe_s is None else probe_s
    if todo and probe_s > 0:
        rates: dict[str, float] = {}
        quiet: dict[str, Any] = {}  # the probe's own quiet-machine record: a probe beside other work is no probe

        def keep(where: tuple[str, ...], job: dict[str, Any], res: dict[str, Any]) -> None:
            rates[where[0]] = res["iterations"] / res["train_time_s"]
            quiet.update(res["quiet"])

        _run_all([((m,), job) for m, job in (
            ("isda", isda_job("speed probe isda", "tune", probe_s, recipe["isda"])),
            ("maskrcnn", maskrcnn_job("speed probe maskrcnn", "tune", probe_s, recipe["maskrcnn"])))],
            jobs, keep, settle)
        probe.update({"steps_per_s": rates, "budget_s": probe_s, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "cpu": cpu_model(), "recipes": recipe, "quiet": quiet})
        log(f"  speed probe ({probe_s:g} s each, side by side): " + ", ".join(
            f"{m} {r:.2f} steps/s" for m, r in rates.items()))
    log(f"  accuracy: {len(todo)} runs, {jobs} at a time, {per_job_threads} thread(s) each")
    _run_all(todo, jobs, record, settle)
    return results


# What two invocations must share for their results to sit in one table.
_SAME = ("num_train", "num_val", "image_size", "threads_per_run", "isda_preset", "isda_config")
# Preset fields left out of that comparison: each run records what they decided (``input_short_side``), and a
# run that set one explicitly carries it in its ``overrides``.
RECORDED_PER_RUN = {"data": ("fit_sizes",)}


def _differs(key: str, old: Any, new: Any) -> bool:
    """Whether two invocations' ``key`` (one of ``_SAME``) measured different things. In the ISDA preset's
    configuration a field only one of them has is not compared (a field added since: opt-in features default
    to off, the earlier code's behaviour), nor are the ``RECORDED_PER_RUN`` ones."""
    if key != "isda_config":
        return old != new
    for section, fields in new.items():
        before = old.get(section)
        if not (isinstance(fields, dict) and isinstance(before, dict)):
            if fields != before:
                return True
        elif any(k in before and before[k] != v for k, v in fields.items()
                 if k not in RECORDED_PER_RUN.get(section, ())):
            return True
    return False


def _deep_merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(old)
    for k, v in new.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def merge(previous: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with the runs of ``previous`` that it does not re-run (a run result carries its own settings, seed
    and load), when both measured the same thing (same datasets, thread share and ISDA preset configuration; a
    field that only one of them recorded is not compared), and earlier results are in this format (runs keyed
    by seed); otherwise ``new`` alone. With another ISDA preset configuration alone, Mask R-CNN's test and
    held-out runs are kept (they do not depend on it), none of ISDA's."""
    if not previous or "seeds" not in previous or any(
            k in previous and k in new and _differs(k, previous[k], new[k]) for k in _SAME if k != "isda_config"):
        return new
    if "isda_config" in previous and "isda_config" in new and _differs("isda_config", previous["isda_config"],
                                                                       new["isda_config"]):
        heldout_mr = {b: mr for b, e in previous.get("heldout", {}).items()
                      if (mr := {k: e[k] for k in HELDOUT_MASKRCNN if k in e})}
        previous = {**{k: previous[k] for k in ("earlier", "_meta") if k in previous}, "seeds": previous["seeds"],
                    "maskrcnn": previous.get("maskrcnn", {}), "heldout": heldout_mr,
                    "budgets_s": sorted({float(b) for b in previous.get("maskrcnn", {})}),
                    "heldout_budgets_s": sorted(float(b) for b in heldout_mr)}
    merged = _deep_merge({k: v for k, v in previous.items() if k != "_meta"}, new)
    merged["earlier"] = previous.get("earlier", []) + ([previous["_meta"]] if "_meta" in previous else [])
    for key in ("budgets_s", "variant_budgets_s", "heldout_budgets_s", "seeds"):
        merged[key] = sorted(set(previous.get(key, [])) | set(new.get(key, [])))
    return merged
