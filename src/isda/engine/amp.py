"""Mixed precision: the autocast context of ``train.amp``."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
