"""Float32 islands in a forward pass that runs under autocast (``train.amp``, inference ``precision="bf16"``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])


def autocast_off(fn: F) -> F:
    """Run ``fn`` with autocast off on the device of its first tensor argument. Autocast runs every matrix
    product in half precision whatever its inputs; inside ``fn`` a product runs in the dtype of its inputs, which
    ``fn`` casts to float32 itself where it needs the precision (sums over thousands of mask pixels, logs of
    probabilities near 0 and 1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        device = next((a.device for a in args if isinstance(a, Tensor)), None)
        if device is None:
            return fn(*args, **kwargs)
        with torch.autocast(device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
