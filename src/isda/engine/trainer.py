"""The training loop (single process or ``torchrun``).

``train`` runs the official recipe (AdamW with reduced-lr parameter groups, gradient clipping, lr drops at
fractions of the run, which lasts a time budget, a number of steps or of epochs: ``engine.schedule``; optional
warm-up / accumulation / AMP), fits the input size to the data (``data.sizing``), writes a run directory and can resume
exactly where it stopped, mid-epoch included. It draws nothing: ``on_validation`` (e.g.
:func:`isda.inference.draw_run`) is called after each validation and at the end of a run without one.

Run directory (``out_dir``): ``config.yaml`` (resolved config), ``metrics.jsonl`` (one JSON object per
line: ``{"type": "train", ...}`` every ``train.log_every`` steps, ``{"type": "val", ...}`` after each
validation, ``{"type": "skip", ...}`` for each step skipped because of a non-finite loss),
``last.pt``, ``best.pt`` (best mask AP) and ``results_val.json`` (COCO results of the last validation).
With ``train.ema_decay`` > 0 a checkpoint's ``model`` (what is validated, predicted with and exported) is the
weights' exponential moving average (``engine.ema``) and ``train_model`` the trained weights that resume continues.

Reproducibility: the sample order of an epoch comes from ``DistributedSampler(seed, epoch)`` and each
sample's augmentation from a generator seeded with (seed, epoch, index), so neither depends on the
number of data workers, the number of processes or where training resumed. A dataset smaller than the
batch is repeated within the epoch, each copy augmented on its own. A "step" (``iter``) is one
optimizer step, i.e. ``train.accumulate`` batches of ``train.batch_size`` images per process.

AMP (``train.amp``): bf16 on CUDA or CPU (where the matrix units of recent CPUs run it faster than float32),
fp16 on CUDA only: on CPU ``train`` refuses it with a ConfigError rather than silently training in another
precision than the config says.

Why one file of about 500 lines: the loop, the checkpoint state and validation all read and update the
same counters (step, epoch, clock, best AP, non-finite streak) of one trainer object; the recipe's parts
that stand alone live next to it (schedule, sampling, metrics, evaluation, checkpoint files).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from ..config import Config, DataConfig, require_backbone_init, save_config
from ..data import CocoInstanceDataset, build_transforms, collate
from ..data.sizing import dataset_stats, fit_sizes, size_warnings
from ..fileio import check_writable_dir, remove_stale_temps
from ..models.isda import ISDA
from ..weights import load_pretrained
from .amp import autocast, check_amp_device
from .checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
)
from .distributed import (
    all_gather_object,
    all_reduce_mean,
    broadcast_flag,
    cleanup_distributed,
    get_rank,
    get_backend,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main_process,
)
from .ema import ema_model
from .evaluation import evaluate, write_results_json
from .metrics import MetricsLog, memory_gb
from .sampling import SeededSamples, run_batches, seed_all
from .schedule import (RunLength, adamw, lr_factor, max_iters_in_warmup_warning, param_groups, steps_at_budget,
                       too_few_steps_warning)

# Called on rank 0 with (run directory, model, validation set or None, the run's data config: its sizes may
# have been fitted to the data) after each validation, and at the end of a run without a validation set:
# where pictures of the run are drawn.
OnValidation = Callable[[Path, ISDA, "CocoInstanceDataset | None", DataConfig], None]

__all__ = ["NonFiniteLossError", "OnValidation", "train"]


class NonFiniteLossError(RuntimeError):
    """Training stopped: the loss was non-finite for ``train.max_nonfinite`` steps in a row, or the weights
    themselves became non-finite (then they are not saved: last.pt / best.pt keep the last finite ones)."""


# ---- data --------------------------------------------------------------------------------------------

def _to_device(images: list[Tensor], targets: list[dict[str, Any]], device: torch.device
               ) -> tuple[list[Tensor], list[dict[str, Any]]]:
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
               for t in targets]
    return images, targets


# ---- training ---------------------------------------------------------------------------------------

def train(cfg: Config, train_ann: str | os.PathLike, train_images: str | os.PathLike,
          val_ann: str | os.PathLike | None = None, val_images: str | os.PathLike | None = None, *,
          out_dir: str | os.PathLike, resume: bool = False, max_iters: int | None = None,
          device: str | None = None, init: str | os.PathLike | None = None,
          log: Callable[[str], None] = tqdm.write, on_validation: OnValidation | None = None) -> dict[str, Any]:
    """Train ISDA on a COCO-format dataset; returns a summary dict (see ``_Trainer.summary``).

    ``cfg.model.num_classes`` is taken from the training set. ``resume``: continue from
    ``out_dir/last.pt`` (a fresh start if there is none); without it an existing ``last.pt`` is an
    error, so a run is never overwritten by accident. ``max_iters``: stop after this many optimizer
    steps in total (counting those before a resume), save and evaluate. ``device``: "cuda", "cpu", ...
    (default: cuda if available). ``init``: initial weights for a fresh run (a Deformable-DETR checkpoint
    in hf/detr/mmdet layout or an isda checkpoint, any class count; see isda.weights). Under torchrun every process
    calls this; only rank 0 writes files and calls ``log`` and ``on_validation``.
    """
    cfg = copy.deepcopy(cfg).validate()
    owns_group = not is_distributed()
    dev = init_distributed(device)
    try:
        # The run lives in its own frame, so that its model (and DDP's hold on the process group) is garbage
        # by the time the group is destroyed below.
        return _train_on(cfg, dev, train_ann, train_images, val_ann, val_images, out_dir=out_dir, resume=resume,
                         max_iters=max_iters, init=init, log=log, on_validation=on_validation)
    finally:
        if owns_group:
            cleanup_distributed()


def _train_on(cfg: Config, dev: torch.device, train_ann: str | os.PathLike, train_images: str | os.PathLike,
              val_ann: str | os.PathLike | None, val_images: str | os.PathLike | None, *, out_dir: str | os.PathLike,
              resume: bool, max_iters: int | None, init: str | os.PathLike | None, log: Callable[[str], None],
              on_validation: OnValidation | None) -> dict[str, Any]:
    check_amp_device(cfg.train.amp, dev)
    out = Path(out_dir)
    if not resume and (out / "last.pt").exists():
        raise FileExistsError(f"{out} already holds a run (last.pt): resume it (--resume) or choose another output directory")
    if not (resume and (out / "last.pt").exists()):
        require_backbone_init(cfg, init)  # a frozen random backbone never learns
    check_writable_dir(out, "output folder")  # before any work, not when the first checkpoint is saved
    say = log if is_main_process() else lambda _msg: None
    train_set = CocoInstanceDataset(train_ann, train_images, build_transforms(cfg.data, True), train=True)
    train_set.require_instances()
    stats = dataset_stats(train_set.coco)
    cfg.data, fitted = fit_sizes(cfg.data, stats, cfg.model.num_queries)
    if fitted:
        say(fitted)
        train_set.transforms = build_transforms(cfg.data, True)
    for warning in size_warnings(cfg.data, stats, cfg.model.num_queries, cfg.model.num_detections):
        say(warning)
    val_set = None
    if val_ann is not None:
        if val_images is None:
            raise ValueError("val_ann given without val_images")
        val_set = CocoInstanceDataset(val_ann, val_images, build_transforms(cfg.data, False), train=False)
        if val_set.cat_ids != train_set.cat_ids:
            raise ValueError(f"validation categories {val_set.cat_ids} differ from training categories "
                             f"{train_set.cat_ids}")
        val_set.require_instances()
    cfg.model.num_classes = train_set.num_classes
    trainer = _Trainer(cfg, train_set, val_set, out, dev, say, on_validation)
    if resume and (out / "last.pt").exists():
        trainer.load(out / "last.pt")
    else:
        if resume:
            trainer.log(f"resume: no checkpoint in {out}, starting from scratch")
        if init is not None:
            trainer.log(str(load_pretrained(init, trainer.model)))
    return trainer.run(max_iters)


class _Trainer:
    def __init__(self, cfg: Config, train_set: CocoInstanceDataset, val_set: CocoInstanceDataset | None,
                 out_dir: Path, device: torch.device, log: Callable[[str], None],
                 on_validation: OnValidation | None = None) -> None:
        self.cfg, self.tcfg = cfg, cfg.train
        self.on_validation = on_validation
        self.train_set, self.val_set = train_set, val_set
        self.out_dir, self.device, self.log = out_dir, device, log
        self.rank, self.world_size = get_rank(), get_world_size()
        # Same seed on every rank: identical initial weights (DDP would broadcast rank 0's anyway).
        seed_all(self.tcfg.seed)
        self.model = ISDA(cfg.model, cfg.loss).to(device)
        # Every trainable parameter reaches the loss (all decoder layers feed the last one), so DDP
        # needs no unused-parameter search.
        self.ddp = (DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
                    if is_distributed() else None)
        self.optimizer = adamw(param_groups(self.model, self.tcfg), self.tcfg.lr, self.tcfg.weight_decay)
        # train.ema_decay: the average is what validation, checkpoints (their "model") and export see.
        self.ema = ema_model(self.model, self.tcfg.ema_decay) if self.tcfg.ema_decay > 0 else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.tcfg.amp == "fp16")

        # A dataset smaller than the global batch is repeated within the epoch (each copy augmented on its own), so
        # that every batch holds train.batch_size images as configured (as an infinite sampler gives): as many
        # copies as make the epoch a whole number of batches.
        batch = self.world_size * self.tcfg.batch_size
        self.repeats = batch // math.gcd(len(train_set), batch) if len(train_set) < batch else 1
        self.samples = SeededSamples(train_set, self.tcfg.seed, self.repeats)
        self.sampler = DistributedSampler(self.samples, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                          seed=self.tcfg.seed)
        self.batches_per_epoch = math.ceil(len(self.sampler) / self.tcfg.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.tcfg.accumulate)
        self.clock = time.perf_counter()  # training time = now - clock (evaluation time is added to clock)
        self.length = RunLength.of(self.tcfg, self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(
            step, self.length.progress(step, self.elapsed()), self.tcfg, self.length.steps))

        self.step = 0  # optimizer steps done (skipped ones included)
        self.epoch = 0
        self.step_in_epoch = 0
        self.batches: Iterator | None = None  # the run's training batches (see train_epoch)
        self.nonfinite = 0  # consecutive skipped steps
        self.best_ap = -1.0
        self.val_stats: dict[str, float] | None = None
        self.last_eval_step = -1
        self.evals_done = 0  # validations at fractions of a run measured in steps or time
        self.session_start: tuple[int, float] | None = None  # (step, elapsed) at this process' first step
        self.estimate_logged = False
        self.train_time = 0.0  # training seconds before this run (from a resumed checkpoint)
        self.saved_step = -1
        self.metrics = MetricsLog(out_dir / "metrics.jsonl", is_main_process())
        # Different dropout streams per process; rank 0 draws what a single process would.
        seed_all(self.tcfg.seed + self.rank)

    @property
    def eval_model(self) -> ISDA:
        """The weights validation, checkpoints and export use: the moving average with train.ema_decay."""
        return self.ema.module if self.ema is not None else self.model

    # ---- checkpoints ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything needed to continue exactly (collective: every rank contributes its RNG state)."""
        return {
            "model": self.eval_model.state_dict(),
            **({"train_model": self.model.state_dict(), "ema_updates": int(self.ema.n_averaged)}
               if self.ema is not None else {}),
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
            "evals_done": self.evals_done,
            "train_time_s": self.elapsed(),
            "world_size": self.world_size,
            "config": self.cfg.to_dict(),
            "class_names": list(self.train_set.class_names),
            "cat_ids": list(self.train_set.cat_ids),
        }

    def save(self, best: bool = False) -> None:
        self.check_weights_finite()  # a checkpoint never holds non-finite weights: the previous one stays
        state = self.state()
        self.saved_step = self.step
        if is_main_process():
            save_checkpoint(state, self.out_dir / "last.pt")
            if best:
                save_checkpoint(state, self.out_dir / "best.pt")

    def check_weights_finite(self) -> None:
        # Weights (and BatchNorm statistics) are identical on every rank, so all ranks raise together.
        tensors = [t for m in {self.model, self.eval_model} for t in m.state_dict().values() if t.is_floating_point()]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise NonFiniteLossError(
                f"training stopped at step {self.step}: the weights became non-finite (NaN/inf); lower train.lr "
                f"or raise train.warmup_iters (last finite checkpoint: {self.out_dir / 'last.pt'}, if any)")

    def load(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location="cpu")
        if list(ckpt.get("cat_ids", [])) != list(self.train_set.cat_ids):
            raise CheckpointError(f"{path} was trained on categories {ckpt.get('cat_ids')}, the dataset has "
                                  f"{self.train_set.cat_ids}")
        if (self.ema is None) != ("train_model" not in ckpt):
            raise CheckpointError(f"{path} was trained with train.ema_decay {'0' if self.ema is not None else '> 0'}: "
                                  f"resume with the same setting")
        load_model_state(self.model, ckpt.get("train_model", ckpt["model"]), source=str(path))
        if self.ema is not None:
            load_model_state(self.ema.module, ckpt["model"], source=str(path))
            self.ema.n_averaged.fill_(ckpt["ema_updates"])
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
        self.evals_done = ckpt.get("evals_done", 0)
        rng = ckpt["rng"]
        restore_rng_state(rng[self.rank % len(rng)])
        self.log(f"resumed from {path}: epoch {self.epoch}, step {self.step}")

    # ---- main loop --------------------------------------------------------------------------------
    def run(self, max_iters: int | None) -> dict[str, Any]:
        if is_main_process():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out_dir / "config.yaml")
            self.metrics.trim(self.step)
            for path in remove_stale_temps(self.out_dir):
                self.log(f"removed {path}: a partial write of a run that was killed")
        self.max_iters = max_iters
        stop_at = min(s for s in (self.length.steps, max_iters) if s is not None) if (
            self.length.steps is not None or max_iters is not None) else None
        self.log(f"training on {len(self.train_set)} images"
                 + (f" (each {self.repeats} times per epoch: fewer than a batch)" if self.repeats > 1 else "")
                 + f", {self.world_size} process(es) x batch "
                 f"{self.tcfg.batch_size} x accumulate {self.tcfg.accumulate}, {self.steps_per_epoch} steps/epoch, "
                 f"on {self.device}" + (f" (DDP, backend {get_backend()})" if self.ddp is not None else ""))
        self.log(f"planned: {self.length.describe(self.tcfg)}"
                 + (f", from step {self.step}" if self.step else "")
                 + (f"; stopping at step {max_iters} (--max-iters)" if max_iters is not None else ""))
        if self.length.steps is not None and (warning := too_few_steps_warning(
                self.length.steps, len(self.train_set), self.images_per_step(), self.length, self.tcfg)):
            self.log(warning)
        if warning := max_iters_in_warmup_warning(max_iters, self.length, self.tcfg):
            self.log(warning)
        self.clock = time.perf_counter() - self.train_time
        stopped = None
        # A time-budget run's bar total is re-estimated from the measured step rate as it goes.
        bar = tqdm(total=stop_at, initial=self.step, dynamic_ncols=True, disable=not is_main_process())
        try:
            while stopped is None:
                stopped = self.should_stop() or self.train_epoch(bar)
        finally:
            bar.close()
            self.batches = None  # ends the loader's workers
        # The end of a run measured in steps or time, or an interrupted one: evaluate and save the final state.
        improved = self.validate() if self.last_eval_step != self.step else False
        if improved or self.saved_step != self.step:
            self.save(best=improved)
        if is_main_process() and self.val_set is None and self.on_validation is not None:
            self.on_validation(self.out_dir, self.model, None, self.cfg.data)
        return self.summary(stopped or "completed")

    def images_per_step(self) -> int:
        return self.world_size * self.tcfg.batch_size * self.tcfg.accumulate

    def should_stop(self) -> str | None:
        """completed (the planned steps), time_budget (the planned time), max_iters (--max-iters) or None."""
        if self.length.steps is not None and self.step >= self.length.steps:
            return "completed"
        if self.max_iters is not None and self.step >= self.max_iters:
            return "max_iters"
        # Rank 0's clock decides, so that every process stops at the same step; a budget shorter than a step still
        # trains one (a run without a step has nothing to save or evaluate).
        if self.length.budget_s > 0 and self.step > 0 and broadcast_flag(self.elapsed() >= self.length.budget_s, self.device):
            return "time_budget"
        return None

    def eval_due(self) -> bool:
        """In a run measured in steps or time: whether the next of its evals_per_run validations is due (rank
        0's clock decides for a time budget, so that every process validates at the same step)."""
        if self.length.unit == "epochs":
            return False
        due = self.length.progress(self.step, self.elapsed()) >= (self.evals_done + 1) / self.tcfg.evals_per_run
        return broadcast_flag(due, self.device) if self.length.budget_s > 0 else due

    def train_epoch(self, bar: tqdm) -> str | None:
        """Train to the end of the epoch (in a run measured in epochs: then validate and save) and return None,
        or to a stop condition and return its name."""
        if self.batches is None:  # one iterator for the rest of the run; skip the batches already trained on
            self.batches = run_batches(self.samples, self.sampler, self.tcfg.batch_size, collate, self.tcfg.num_workers,
                                       self.tcfg.seed, self.epoch, self.step_in_epoch * self.tcfg.accumulate,
                                       pin_memory=self.device.type == "cuda")
        batches = self.batches
        while self.step_in_epoch < self.steps_per_epoch:
            n = min(self.tcfg.accumulate, self.batches_per_epoch - self.step_in_epoch * self.tcfg.accumulate)
            self.train_step(batches, n, bar)
            epoch_end = self.step_in_epoch == self.steps_per_epoch
            if epoch_end:
                self.epoch += 1
                self.step_in_epoch = 0
            if stopped := self.should_stop():
                return stopped
            if self.eval_due():
                self.evals_done += 1
                self.save(best=self.validate())
            elif epoch_end and self.length.unit == "epochs":
                self.save(best=self.validate() if self.epoch % self.tcfg.eval_every == 0 else False)
            elif self.tcfg.checkpoint_every > 0 and self.step % self.tcfg.checkpoint_every == 0:
                self.save()
            if epoch_end:
                return None
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
                with autocast(self.device, self.tcfg.amp):
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
            if self.ema is not None:
                self.ema.update_parameters(self.model)
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
        if self.length.budget_s > 0:
            self.plan_budget(bar)
        bar.update(1)

    def plan_budget(self, bar: tqdm) -> None:
        """A time-budget run's step count, estimated from the step rate after a few warm-up steps: shown as the
        progress bar's total, logged once (with the too-few-steps warning)."""
        warmup = 2  # the first steps include start-up work (data workers, allocator)
        if self.session_start is None:
            self.session_start = (self.step, self.elapsed())
            return
        done = self.step - self.session_start[0]
        if done < warmup:
            return
        rate = (self.elapsed() - self.session_start[1]) / done
        planned = steps_at_budget(self.step, self.elapsed(), rate, self.length.budget_s)
        bar.total = planned if self.max_iters is None else min(planned, self.max_iters)
        if not self.estimate_logged and done >= 3 * warmup:
            self.estimate_logged = True
            self.log(f"planned: about {planned} steps in the {self.length.budget_s:g} s budget at {rate:.2f} s/step")
            if warning := too_few_steps_warning(planned, len(self.train_set), self.images_per_step(), self.length,
                                                self.tcfg, estimated=True):
                self.log(warning)

    # ---- logging ----------------------------------------------------------------------------------
    def record_train(self, values: dict[str, float], grad_norm: float, lr: float, bar: tqdm) -> None:
        """Progress bar every step; a metrics row (means since the last row) every log_every steps."""
        self.metrics.accumulate({**values, "grad_norm": grad_norm})
        bar.set_postfix(epoch=self.epoch, loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}",
                        mem=f"{memory_gb(self.device):.2f}G", refresh=False)
        if self.step % self.tcfg.log_every == 0:
            self.metrics.write_means({"type": "train", "epoch": self.epoch, "iter": self.step},
                                     {"lr": lr, "time": round(self.elapsed(), 3)})

    def record_skip(self) -> None:
        self.nonfinite += 1
        self.metrics.write({"type": "skip", "epoch": self.epoch, "iter": self.step, "reason": "non-finite loss",
                            "consecutive": self.nonfinite, "time": round(self.elapsed(), 3)})
        self.log(f"step {self.step}: non-finite loss or gradient, step skipped "
                 f"({self.nonfinite}/{self.tcfg.max_nonfinite} in a row)")
        # A skip cannot repair weights that are already non-finite (e.g. an lr that overflows): stop now.
        self.check_weights_finite()
        if self.nonfinite >= self.tcfg.max_nonfinite:
            raise NonFiniteLossError(
                f"training stopped at step {self.step}: the loss was non-finite for {self.nonfinite} steps in a "
                f"row (train.max_nonfinite); lower train.lr, raise train.warmup_iters or check the data "
                f"(last checkpoint: {self.out_dir / 'last.pt'})")

    def elapsed(self) -> float:
        """Training seconds so far, over all resumes, validation excluded."""
        return time.perf_counter() - self.clock

    # ---- validation -------------------------------------------------------------------------------
    def validate(self) -> bool:
        """Evaluate on the validation set (if any); returns whether the mask AP is the best so far."""
        if self.val_set is None:
            return False
        start = time.perf_counter()
        # Evaluation draws from the global RNG (its loader's seed); training (query denoising's noise) goes on with
        # the draws it would have had without it, so a run trains the same whatever its validation schedule.
        rng = capture_rng_state()
        try:
            result, results = evaluate(self.eval_model, self.val_set, self.device, self.tcfg.batch_size,
                                       num_workers=self.tcfg.num_workers, amp=self.tcfg.amp,
                                       window=self.cfg.data.test_window)
        finally:
            restore_rng_state(rng)
        self.last_eval_step = self.step
        self.val_stats = result.stats
        improved = result.stats["AP"] > self.best_ap
        self.best_ap = max(self.best_ap, result.stats["AP"])
        if is_main_process():
            write_results_json(results, self.out_dir / "results_val.json")
            self.metrics.write({"type": "val", "epoch": self.epoch, "iter": self.step, **result.stats,
                                "per_category": result.per_category, "time": round(start - self.clock, 3)})
            self.log(f"validation at epoch {self.epoch}, step {self.step} (mask AP, %):\n{result.table()}")
            if self.on_validation is not None:
                self.on_validation(self.out_dir, self.eval_model, self.val_set, self.cfg.data)
        self.clock += time.perf_counter() - start  # evaluation is not training time
        return improved

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
