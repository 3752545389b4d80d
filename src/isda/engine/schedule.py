"""The official recipe's optimizer groups and learning-rate schedule (epochs or a time budget)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import TrainConfig

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
