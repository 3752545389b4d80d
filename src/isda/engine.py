"""Training and evaluation loops (single process or ``torchrun``).

``train`` runs the official recipe (AdamW with reduced-lr parameter groups, gradient clipping, step
schedule by epoch, optional warm-up / accumulation / AMP), writes a run directory and can resume
exactly where it stopped, mid-epoch included. ``evaluate`` computes COCO mask AP on a dataset.

Run directory (``out_dir``): ``config.yaml`` (resolved config), ``metrics.jsonl`` (one JSON object per
line: ``{"type": "train", ...}`` every ``train.log_every`` steps, ``{"type": "val", ...}`` after each
validation, ``{"type": "skip", ...}`` for each step skipped because of a non-finite loss),
``last.pt``, ``best.pt`` (best mask AP) and ``results_val.json`` (COCO results of the last validation).

Reproducibility: the sample order of an epoch comes from ``DistributedSampler(seed, epoch)`` and each
sample's augmentation from a generator seeded with (seed, epoch, index), so neither depends on the
number of data workers, the number of processes or where training resumed. A "step" (``iter``) is one
optimizer step, i.e. ``train.accumulate`` batches of ``train.batch_size`` images per process.

AMP (``train.amp`` bf16/fp16) needs CUDA: on CPU ``train`` refuses it with a ConfigError rather than
silently training in another precision than the config says.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import resource
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from .checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
)
from .config import Config, ConfigError, TrainConfig, atomic_write_text, save_config
from .data import CocoInstanceDataset, build_transforms, collate
from .distributed import (
    all_gather_object,
    all_reduce_mean,
    broadcast_flag,
    broadcast_object,
    cleanup_distributed,
    get_rank,
    get_backend,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main_process,
)
from .evaluation import EvalResult, evaluate_masks, gather_results, predictions_to_coco_results, write_results_json
from .inference import draw_examples
from .model import ISDA
from .visualize import plot_curves, save_grid
from .weights import load_pretrained

__all__ = ["NonFiniteLossError", "SeededSamples", "evaluate", "lr_factor", "param_groups", "train"]


class NonFiniteLossError(RuntimeError):
    """Training stopped: the loss was non-finite for ``train.max_nonfinite`` steps in a row."""


# ---- optimizer and schedule -------------------------------------------------------------------------

def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups of the official recipe: the backbone at lr x lr_backbone_mult; the deformable-attention
    sampling offsets and the reference-point projection at lr x lr_linear_proj_mult; the rest at lr.
    Frozen parameters (requires_grad False) are left out; empty groups are dropped."""
    groups: dict[str, list[nn.Parameter]] = {"backbone": [], "linear_proj": [], "other": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            groups["backbone"].append(p)
        elif ".sampling_offsets." in name or name.startswith("transformer.reference_points."):
            groups["linear_proj"].append(p)
        else:
            groups["other"].append(p)
    lrs = {"backbone": cfg.lr * cfg.lr_backbone_mult, "linear_proj": cfg.lr * cfg.lr_linear_proj_mult,
           "other": cfg.lr}
    return [{"name": k, "params": v, "lr": lrs[k]} for k, v in groups.items() if v]


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based): x lr_gamma at each epoch of
    lr_steps reached, times a linear warm-up from 1/warmup_iters to 1 over the first warmup_iters steps.

    With a time budget (``time_budget_s``) the schedule follows the budget too: the run is at epoch
    ``epochs * elapsed / budget`` at the latest, so a short run still gets its lr drops, in proportion."""
    epoch = step / steps_per_epoch
    if cfg.time_budget_s > 0:
        epoch = max(epoch, cfg.epochs * elapsed_s / cfg.time_budget_s)
    factor = cfg.lr_gamma ** sum(epoch >= milestone for milestone in cfg.lr_steps)
    if cfg.warmup_iters > 0:
        factor *= min(1.0, (step + 1) / cfg.warmup_iters)
    return factor


# ---- data --------------------------------------------------------------------------------------------

class SeededSamples(Dataset):
    """Wraps a dataset so that sample ``i`` of epoch ``e`` is augmented with RNGs seeded from
    (seed, e, i), whichever worker or process loads it; the caller's RNG states are left untouched."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def _to_device(images: list[Tensor], targets: list[dict[str, Any]], device: torch.device
               ) -> tuple[list[Tensor], list[dict[str, Any]]]:
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


# ---- evaluation -------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, dataset: CocoInstanceDataset, device: torch.device | str, batch_size: int = 1,
             *, num_workers: int = 0, amp: str = "none") -> tuple[EvalResult, list[dict[str, Any]]]:
    """COCO mask AP of ``model`` on ``dataset`` (built with ``train=False``), masks at the original size.

    Under torch.distributed each process predicts every world_size-th image and the results are
    gathered; every process returns the same (EvalResult, COCO results list). The model's train/eval
    mode is restored afterwards.
    """
    device = torch.device(device)
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    indices = list(range(get_rank(), len(dataset), get_world_size()))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices, collate_fn=collate,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    results: list[dict[str, Any]] = []
    for images, targets in tqdm(loader, desc="eval", leave=False, dynamic_ncols=True, disable=not is_main_process()):
        with _autocast(device, amp):
            preds = net([im.to(device, non_blocking=True) for im in images],
                        output_sizes=[tuple(t["orig_size"]) for t in targets])
        # Convert per batch: full-size masks of a whole dataset would not fit in memory.
        results += predictions_to_coco_results(preds, [t["image_id"] for t in targets], dataset.cat_ids)
    net.train(was_training)
    results = gather_results(results)
    # COCOeval is single-threaded and slow: run it once, on rank 0, and share the numbers.
    summary = evaluate_masks(dataset.coco, results, image_ids=dataset.ids) if is_main_process() else None
    return broadcast_object(summary), results


# ---- training ---------------------------------------------------------------------------------------

def train(cfg: Config, train_ann: str | os.PathLike, train_images: str | os.PathLike,
          val_ann: str | os.PathLike | None = None, val_images: str | os.PathLike | None = None, *,
          out_dir: str | os.PathLike, resume: bool = False, max_iters: int | None = None,
          device: str | None = None, init: str | os.PathLike | None = None,
          log: Callable[[str], None] = tqdm.write) -> dict[str, Any]:
    """Train ISDA on a COCO-format dataset; returns a summary dict (see ``_Trainer.summary``).

    ``cfg.model.num_classes`` is taken from the training set. ``resume``: continue from
    ``out_dir/last.pt`` (a fresh start if there is none); without it an existing ``last.pt`` is an
    error, so a run is never overwritten by accident. ``max_iters``: stop after this many optimizer
    steps in total (counting those before a resume), save and evaluate. ``device``: "cuda", "cpu", ...
    (default: cuda if available). ``init``: initial weights for a fresh run (a Deformable-DETR checkpoint
    in hf/detr/mmdet layout or an isda checkpoint, any class count; see isda.weights). Under torchrun every process calls this; only rank 0 writes files
    and calls ``log``.
    """
    cfg = copy.deepcopy(cfg).validate()
    owns_group = not is_distributed()
    dev = init_distributed(device)
    try:
        if cfg.train.amp != "none" and dev.type != "cuda":
            raise ConfigError(f"config field 'train.amp': {cfg.train.amp} needs a CUDA device; "
                              "set train.amp=none to train on CPU")
        out = Path(out_dir)
        if not resume and (out / "last.pt").exists():
            raise FileExistsError(f"{out} already holds a run (last.pt): resume it (--resume) or choose another output directory")
        train_set = CocoInstanceDataset(train_ann, train_images, build_transforms(cfg.data, True), train=True)
        val_set = None
        if val_ann is not None:
            if val_images is None:
                raise ValueError("val_ann given without val_images")
            val_set = CocoInstanceDataset(val_ann, val_images, build_transforms(cfg.data, False), train=False)
            if val_set.cat_ids != train_set.cat_ids:
                raise ValueError(f"validation categories {val_set.cat_ids} differ from training categories "
                                 f"{train_set.cat_ids}")
        cfg.model.num_classes = train_set.num_classes
        trainer = _Trainer(cfg, train_set, val_set, out, dev, log if is_main_process() else lambda _msg: None)
        if resume and (out / "last.pt").exists():
            trainer.load(out / "last.pt")
        else:
            if resume:
                trainer.log(f"resume: no checkpoint in {out}, starting from scratch")
            if init is not None:
                trainer.log(str(load_pretrained(init, trainer.model)))
        return trainer.run(max_iters)
    finally:
        if owns_group:
            cleanup_distributed()


class _Trainer:
    def __init__(self, cfg: Config, train_set: CocoInstanceDataset, val_set: CocoInstanceDataset | None,
                 out_dir: Path, device: torch.device, log: Callable[[str], None]) -> None:
        self.cfg, self.tcfg = cfg, cfg.train
        self.train_set, self.val_set = train_set, val_set
        self.out_dir, self.device, self.log = out_dir, device, log
        self.rank, self.world_size = get_rank(), get_world_size()
        # Same seed on every rank: identical initial weights (DDP would broadcast rank 0's anyway).
        _seed_all(self.tcfg.seed)
        self.model = ISDA(cfg.model, cfg.loss).to(device)
        # Every trainable parameter reaches the loss (all decoder layers feed the last one), so DDP
        # needs no unused-parameter search.
        self.ddp = (DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
                    if is_distributed() else None)
        # foreach: one multi-tensor update instead of a Python loop over ~300 tensors (the CPU default).
        self.optimizer = torch.optim.AdamW(param_groups(self.model, self.tcfg), lr=self.tcfg.lr,
                                           weight_decay=self.tcfg.weight_decay, foreach=True)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.tcfg.amp == "fp16")

        self.samples = SeededSamples(train_set, self.tcfg.seed)
        self.sampler = DistributedSampler(train_set, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                          seed=self.tcfg.seed)
        self.batches_per_epoch = math.ceil(len(self.sampler) / self.tcfg.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.tcfg.accumulate)
        self.clock = time.perf_counter()  # training time = now - clock (evaluation time is added to clock)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.steps_per_epoch, self.tcfg, self.elapsed()))

        self.step = 0  # optimizer steps done (skipped ones included)
        self.epoch = 0
        self.step_in_epoch = 0
        self.nonfinite = 0  # consecutive skipped steps
        self.best_ap = -1.0
        self.val_stats: dict[str, float] | None = None
        self.last_eval_step = -1
        self.train_time = 0.0  # training seconds before this run (from a resumed checkpoint)
        self.saved_step = -1
        self.window: dict[str, float] = {}  # sums of the logged values since the last train row
        # Different dropout streams per process; rank 0 draws what a single process would.
        _seed_all(self.tcfg.seed + self.rank)

    # ---- checkpoints ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything needed to continue exactly (collective: every rank contributes its RNG state)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": all_gather_object(capture_rng_state()),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "iteration": self.step,
            "nonfinite": self.nonfinite,
            "best_ap": self.best_ap,
            "val_stats": self.val_stats,
            "last_eval_step": self.last_eval_step,
            "train_time_s": self.elapsed(),
            "world_size": self.world_size,
            "config": self.cfg.to_dict(),
            "class_names": list(self.train_set.class_names),
            "cat_ids": list(self.train_set.cat_ids),
        }

    def save(self, best: bool = False) -> None:
        state = self.state()
        self.saved_step = self.step
        if is_main_process():
            save_checkpoint(state, self.out_dir / "last.pt")
            if best:
                save_checkpoint(state, self.out_dir / "best.pt")

    def load(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location="cpu")
        if list(ckpt.get("cat_ids", [])) != list(self.train_set.cat_ids):
            raise CheckpointError(f"{path} was trained on categories {ckpt.get('cat_ids')}, the dataset has "
                                  f"{self.train_set.cat_ids}")
        load_model_state(self.model, ckpt["model"], source=str(path))
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:
            raise CheckpointError(f"{path}: optimizer state does not fit ({e})") from None
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler.is_enabled() and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step_in_epoch, self.step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["iteration"]
        self.nonfinite, self.best_ap, self.val_stats = ckpt["nonfinite"], ckpt["best_ap"], ckpt["val_stats"]
        self.last_eval_step, self.train_time = ckpt["last_eval_step"], ckpt["train_time_s"]
        rng = ckpt["rng"]
        restore_rng_state(rng[self.rank % len(rng)])
        self.log(f"resumed from {path}: epoch {self.epoch}, step {self.step}")

    # ---- main loop --------------------------------------------------------------------------------
    def run(self, max_iters: int | None) -> dict[str, Any]:
        if is_main_process():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out_dir / "config.yaml")
            _trim_metrics(self.out_dir / "metrics.jsonl", self.step)
        total = self.tcfg.epochs * self.steps_per_epoch
        stop_at = min(total, max_iters) if max_iters is not None else total
        self.log(f"training on {len(self.train_set)} images, {self.world_size} process(es) x batch "
                 f"{self.tcfg.batch_size} x accumulate {self.tcfg.accumulate}, {self.steps_per_epoch} steps/epoch, "
                 f"steps {self.step} -> {stop_at} on {self.device}"
                 + (f" (DDP, backend {get_backend()})" if self.ddp is not None else ""))
        self.clock = time.perf_counter() - self.train_time
        stopped = None
        bar = tqdm(total=stop_at, initial=self.step, dynamic_ncols=True, disable=not is_main_process())
        try:
            while self.epoch < self.tcfg.epochs and stopped is None:
                stopped = self.should_stop(stop_at) or self.train_epoch(stop_at, bar)
        finally:
            bar.close()
        if stopped is not None:  # interrupted run: evaluate and save the final state
            improved = self.validate() if self.last_eval_step != self.step else False
            if improved or self.saved_step != self.step:
                self.save(best=improved)
        if is_main_process() and self.val_set is None:
            self.draw()
        return self.summary(stopped or "completed")

    def should_stop(self, stop_at: int) -> str | None:
        if self.step >= stop_at:
            return "max_iters"
        # Rank 0's clock decides, so that every process stops at the same step.
        if self.tcfg.time_budget_s > 0 and broadcast_flag(self.elapsed() >= self.tcfg.time_budget_s, self.device):
            return "time_budget"
        return None

    def train_epoch(self, stop_at: int, bar: tqdm) -> str | None:
        """Train to the end of the epoch (then validate and save; returns None) or to a stop condition
        (returns its name)."""
        self.sampler.set_epoch(self.epoch)
        self.samples.set_epoch(self.epoch)
        done = self.step_in_epoch * self.tcfg.accumulate
        indices = list(self.sampler)[done * self.tcfg.batch_size:]  # skip the batches already trained on
        loader = DataLoader(self.samples, batch_size=self.tcfg.batch_size, sampler=indices, collate_fn=collate,
                            num_workers=self.tcfg.num_workers, pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(self.tcfg.seed))
        batches = iter(loader)
        while self.step_in_epoch < self.steps_per_epoch:
            n = min(self.tcfg.accumulate, self.batches_per_epoch - self.step_in_epoch * self.tcfg.accumulate)
            self.train_step(batches, n, bar)
            if self.step_in_epoch < self.steps_per_epoch:
                if self.tcfg.checkpoint_every > 0 and self.step % self.tcfg.checkpoint_every == 0:
                    self.save()
                if stopped := self.should_stop(stop_at):
                    return stopped
        self.epoch += 1
        self.step_in_epoch = 0
        due = self.epoch % self.tcfg.eval_every == 0 or self.epoch == self.tcfg.epochs
        self.save(best=self.validate() if due else False)
        return None

    def train_step(self, batches: Iterator, n: int, bar: tqdm) -> None:
        """One optimizer step over ``n`` batches (gradient accumulation); skipped if a loss is non-finite."""
        net = self.ddp or self.model
        values: dict[str, float] = {}
        finite = True
        # A skipped step must leave the whole state alone, BatchNorm running statistics included (the
        # forward pass updates them, possibly with NaN).
        buffers = [b.detach().clone() for b in self.model.buffers()]
        for i in range(n):
            images, targets = _to_device(*next(batches), self.device)
            if not finite:
                continue  # keep consuming the window's batches so that the data position stays right
            # Gradients are all-reduced only on the window's last backward.
            sync = contextlib.nullcontext() if self.ddp is None or i == n - 1 else self.ddp.no_sync()
            with sync:
                with _autocast(self.device, self.tcfg.amp):
                    losses = net(images, targets)
                # Averaged over processes: for logging, and so that all ranks skip a step together.
                mean = all_reduce_mean(torch.stack([v.detach().float() for v in losses.values()])).tolist()
                if not all(math.isfinite(v) for v in mean):
                    finite = False
                    continue
                self.scaler.scale(losses["loss"] / n).backward()
            for k, v in zip(losses, mean):
                values[k] = values.get(k, 0.0) + v / n

        grad_norm = math.nan
        if finite:
            self.scaler.unscale_(self.optimizer)
            max_norm = self.tcfg.clip_max_norm if self.tcfg.clip_max_norm > 0 else math.inf
            grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
            # With fp16 the scaler skips overflowing steps itself; otherwise a non-finite gradient is a skip.
            finite = self.scaler.is_enabled() or math.isfinite(grad_norm)
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[-1]["lr"]  # the 'other' group: the base lr
        with warnings.catch_warnings():
            # The schedule counts steps, skipped ones included, so a skipped first step is no misuse.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
            self.scheduler.step()
        self.step += 1
        self.step_in_epoch += 1
        if finite:
            self.nonfinite = 0
            self.record_train(values, grad_norm, lr, bar)
        else:
            self.record_skip()
        bar.update(1)

    # ---- logging ----------------------------------------------------------------------------------
    def record_train(self, values: dict[str, float], grad_norm: float, lr: float, bar: tqdm) -> None:
        """Progress bar every step; a metrics row (means since the last row) every log_every steps."""
        for k, v in {**values, "grad_norm": grad_norm, "count": 1.0}.items():
            self.window[k] = self.window.get(k, 0.0) + v
        bar.set_postfix(epoch=self.epoch, loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}",
                        mem=f"{_memory_gb(self.device):.2f}G", refresh=False)
        if self.step % self.tcfg.log_every == 0:
            count = self.window.pop("count")
            self.write_metrics({"type": "train", "epoch": self.epoch, "iter": self.step,
                                **{k: v / count for k, v in self.window.items()}, "lr": lr,
                                "time": round(self.elapsed(), 3)})
            self.window = {}

    def record_skip(self) -> None:
        self.nonfinite += 1
        self.write_metrics({"type": "skip", "epoch": self.epoch, "iter": self.step, "reason": "non-finite loss",
                            "consecutive": self.nonfinite, "time": round(self.elapsed(), 3)})
        self.log(f"step {self.step}: non-finite loss or gradient, step skipped "
                 f"({self.nonfinite}/{self.tcfg.max_nonfinite} in a row)")
        if self.nonfinite >= self.tcfg.max_nonfinite:
            raise NonFiniteLossError(
                f"training stopped at step {self.step}: the loss was non-finite for {self.nonfinite} steps in a "
                f"row (train.max_nonfinite); lower train.lr, raise train.warmup_iters or check the data "
                f"(last checkpoint: {self.out_dir / 'last.pt'})")

    def write_metrics(self, row: dict[str, Any]) -> None:
        if is_main_process():
            # null instead of NaN/Infinity (e.g. an fp16 overflow's grad norm): those are not JSON.
            row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def elapsed(self) -> float:
        """Training seconds so far, over all resumes, validation excluded."""
        return time.perf_counter() - self.clock

    # ---- validation -------------------------------------------------------------------------------
    def validate(self) -> bool:
        """Evaluate on the validation set (if any); returns whether the mask AP is the best so far."""
        if self.val_set is None:
            return False
        start = time.perf_counter()
        result, results = evaluate(self.model, self.val_set, self.device, self.tcfg.batch_size,
                                   num_workers=self.tcfg.num_workers, amp=self.tcfg.amp)
        self.last_eval_step = self.step
        self.val_stats = result.stats
        improved = result.stats["AP"] > self.best_ap
        self.best_ap = max(self.best_ap, result.stats["AP"])
        if is_main_process():
            write_results_json(results, self.out_dir / "results_val.json")
            self.write_metrics({"type": "val", "epoch": self.epoch, "iter": self.step, **result.stats,
                                "per_category": result.per_category, "time": round(start - self.clock, 3)})
            self.log(f"validation at epoch {self.epoch}, step {self.step} (mask AP, %):\n{result.table()}")
            self.draw()
        self.clock += time.perf_counter() - start  # evaluation is not training time
        return improved

    def draw(self) -> None:
        """curves.png (loss and AP so far) and val_predictions.png (a few validation images)."""
        if (self.out_dir / "metrics.jsonl").exists():  # nothing logged yet after a zero-step run
            plot_curves(self.out_dir / "metrics.jsonl", self.out_dir / "curves.png")
        if self.val_set is not None:
            images = draw_examples(self.model, self.cfg.data, self.val_set, self.train_set.class_names, count=4)
            save_grid(images, self.out_dir / "val_predictions.png")

    def summary(self, stopped: str) -> dict[str, Any]:
        return {
            "stopped": stopped,  # completed | max_iters | time_budget
            "epoch": self.epoch,  # epochs completed
            "iteration": self.step,
            "train_time_s": self.elapsed(),
            "val": self.val_stats,
            "best_ap": self.best_ap if self.best_ap >= 0 else None,
            "out_dir": str(self.out_dir),
            "last_checkpoint": str(self.out_dir / "last.pt"),
        }


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _memory_gb(device: torch.device) -> float:
    """Peak memory: CUDA allocations on GPU, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the rows up to ``step``: after a resume, rows logged past the checkpoint would repeat (and a
    row cut short by a crash is dropped)."""
    if not path.exists():
        return

    def keep(line: str) -> bool:
        try:
            return json.loads(line)["iter"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    atomic_write_text(path, "".join(line + "\n" for line in path.read_text().splitlines() if keep(line)))
