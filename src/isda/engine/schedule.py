"""The official recipe's optimizer groups, the run's length and its learning-rate schedule.

A run is defined by one of three lengths, in this order: ``train.time_budget_s`` (training seconds: the run
lasts that long, epoch after epoch), ``train.max_steps`` (optimizer steps, detectron2's MAX_ITER) or
``train.epochs``. The lr drops (``train.lr_drops``) are fractions of that length, so one recipe fits a
3-image dataset, COCO and a 6-minute budget alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig

# Fewer optimizer steps than this rarely learn anything from scratch (the tiny preset's AP on the shapes
# dataset is still near 0 after 250 steps, docs/convergence.md): the trainer warns.
MIN_USEFUL_STEPS = 300


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


def adamw(params: Iterable[nn.Parameter] | list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with its fused kernel where PyTorch has one (CPU, CUDA): one pass over each parameter and its two
    moments instead of a chain of elementwise ops. On the CPU the update took a tenth of a tiny training step
    as a loop (per tensor or foreach) and a quarter of that fused. Other devices: the foreach loop."""
    params = list(params)
    first = params[0]["params"][0] if isinstance(params[0], dict) else params[0]
    fast = {"fused": True} if first.device.type in ("cpu", "cuda") else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fast)


@dataclass(frozen=True)
class RunLength:
    """How long a run is: ``steps`` optimizer steps (None for a time budget, whose step count is only
    estimated once training runs) or ``budget_s`` training seconds."""

    steps: int | None
    budget_s: float
    steps_per_epoch: int
    unit: str  # "time_budget_s" | "max_steps" | "epochs": the field that set it

    @classmethod
    def of(cls, cfg: TrainConfig, steps_per_epoch: int) -> "RunLength":
        if cfg.time_budget_s > 0:
            return cls(None, cfg.time_budget_s, steps_per_epoch, "time_budget_s")
        if cfg.max_steps > 0:
            return cls(cfg.max_steps, 0.0, steps_per_epoch, "max_steps")
        return cls(cfg.epochs * steps_per_epoch, 0.0, steps_per_epoch, "epochs")

    def progress(self, step: int, elapsed_s: float) -> float:
        """Fraction of the run done after ``step`` optimizer steps and ``elapsed_s`` training seconds."""
        return elapsed_s / self.budget_s if self.steps is None else step / max(self.steps, 1)

    def describe(self, cfg: TrainConfig) -> str:
        if self.unit == "time_budget_s":
            return f"a time budget of {self.budget_s:g} s (train.epochs and train.max_steps not used)"
        if self.unit == "max_steps":
            return f"{self.steps} optimizer steps (train.max_steps; train.epochs not used)"
        return f"{cfg.epochs} epochs x {self.steps_per_epoch} steps = {self.steps} optimizer steps"


def warmup_factor(progress: float, warmup_frac: float) -> float:
    """Linear warm-up over the first ``warmup_frac`` of the run (``progress`` in [0, 1]); 1 % of the lr at the
    first step rather than none."""
    return min(1.0, max(progress / warmup_frac, 0.01)) if warmup_frac > 0 else 1.0


def lr_factor(step: int, progress: float, cfg: TrainConfig, total_steps: int | None = None) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based) at ``progress`` (fraction of the run):
    x lr_gamma for each fraction of ``lr_drops`` reached, times a linear warm-up from 1/warmup_iters to 1 over
    the first warmup_iters steps and one over the first ``warmup_frac`` of the run (:func:`warmup_factor`). With ``total_steps`` a drop falls on the step ``round(fraction x total)``,
    so a drop at 27/42 of a 42-epoch run lands exactly on the first step of epoch 27 (the official recipe)."""
    if total_steps is not None:
        reached = sum(step >= round(f * total_steps) for f in cfg.lr_drops)
    else:
        reached = sum(progress >= f for f in cfg.lr_drops)
    factor = cfg.lr_gamma ** reached
    if cfg.warmup_iters > 0:
        factor *= min(1.0, (step + 1) / cfg.warmup_iters)
    return factor * warmup_factor(progress, cfg.warmup_frac)


def too_few_steps_warning(steps: int, num_images: int, images_per_step: int, length: RunLength,
                          cfg: TrainConfig, estimated: bool = False) -> str | None:
    """The warning printed when a run plans fewer than MIN_USEFUL_STEPS steps (None when it plans enough)."""
    if steps >= MIN_USEFUL_STEPS:
        return None
    about = "about " if estimated else ""
    how = (f"{length.steps_per_epoch} step(s) per epoch of {num_images} images at {images_per_step} per step"
           if length.unit == "epochs" else length.describe(cfg))
    return (f"warning: only {about}{steps} optimizer steps planned ({how}); fewer than {MIN_USEFUL_STEPS} rarely "
            f"learn anything: set train.max_steps (e.g. {max(2000, 10 * MIN_USEFUL_STEPS)}) or a longer "
            f"train.time_budget_s")


def max_iters_in_warmup_warning(max_iters: int | None, length: RunLength, cfg: TrainConfig) -> str | None:
    """The warning printed when ``--max-iters`` ends a step-planned run inside its ``warmup_frac`` warm-up: the
    warm-up is a fraction of the planned run, so such a run never trains at ``train.lr`` (None otherwise)."""
    if max_iters is None or length.steps is None or cfg.warmup_frac <= 0:
        return None
    warmup_steps = math.ceil(cfg.warmup_frac * length.steps)
    if max_iters >= warmup_steps:
        return None
    return (f"warning: --max-iters {max_iters} stops inside the lr warm-up (train.warmup_frac={cfg.warmup_frac:g}: "
            f"the first {warmup_steps} of {length.steps} planned steps), so the run never reaches train.lr; "
            f"set train.max_steps={max_iters} to plan a run of that length")


def steps_at_budget(step: int, elapsed_s: float, rate_s: float, budget_s: float) -> int:
    """Estimated total steps of a time-budget run: those done plus what the rest of the budget holds at
    ``rate_s`` seconds per step."""
    return step + max(0, math.floor((budget_s - elapsed_s) / max(rate_s, 1e-9)))
