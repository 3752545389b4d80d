"""Exponential moving average of the weights (``train.ema_decay``): what a run evaluates, saves and exports.

The average is :class:`torch.optim.swa_utils.AveragedModel` (weights and buffers) with a decay that ramps up as
``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (the ramp of TensorFlow's ``ExponentialMovingAverage``
with ``num_updates``): early on the average spans about the last tenth of the run, so the random initialisation
fades within the first steps even in a run of a few hundred steps; later it spans ``1 / (1 - decay)`` steps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


def ramped_decay(decay: float, updates: int) -> float:
    """The decay of update ``updates + 1`` (``updates`` done before it)."""
    return min(decay, (1 + updates) / (10 + updates))


def ema_model(model: nn.Module, decay: float) -> AveragedModel:
    """A copy of ``model`` whose ``update_parameters(model)`` moves every floating-point weight and buffer towards
    ``model``'s by ``1 - ramped_decay``; other buffers (counters) are copied."""

    def average(averaged: list[Tensor], current: list[Tensor], updates: Tensor) -> None:
        if averaged[0].is_floating_point():  # AveragedModel groups the tensors by dtype
            torch._foreach_lerp_(averaged, current, 1.0 - ramped_decay(decay, int(updates)))
        else:
            torch._foreach_copy_(averaged, current)

    return AveragedModel(model, multi_avg_fn=average, use_buffers=True)
