"""Mixed precision: the autocast context of ``train.amp`` and the devices that run it."""

from __future__ import annotations

import contextlib

import torch

from ..config import ConfigError


def check_amp_device(amp: str, device: torch.device) -> None:
    """bf16 autocast runs on CUDA and on the CPU; fp16 on CUDA only (the CPU has no fp16 matrix units and no
    loss scaling): a ConfigError rather than training in another precision than the config says."""
    if amp == "fp16" and device.type != "cuda" or amp == "bf16" and device.type not in ("cuda", "cpu"):
        raise ConfigError(f"config field 'train.amp': {amp} needs a CUDA device"
                          f"{'; bf16 also runs on the CPU' if amp == 'fp16' else ''} (got {device.type}); "
                          "set train.amp=none for float32")


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
