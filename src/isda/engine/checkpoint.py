"""Checkpoints: atomic writes, ``weights_only`` loading, RNG state capture and clear mismatch errors.

A checkpoint is a plain dict of tensors and primitive containers (dict, list, tuple, str, int, float,
bool, None), so ``torch.load(path, weights_only=True)`` reads it without executing pickled code.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from ..fileio import atomic_open
from ..weights.io import WeightsError, load_torch_file


# A checkpoint is missing, unreadable, or does not fit the model / dataset (one-line message): the error of
# every weights loader, under the name the trainer's callers know.
CheckpointError = WeightsError


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to a temp file in the target directory, then rename it over ``path``: a crash
    mid-write leaves the previous checkpoint intact and no partial file behind."""
    with atomic_open(path, "wb") as f:
        torch.save(state, f)

def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; any failure becomes a one-line CheckpointError."""
    state = load_torch_file(path, "checkpoint", "readable checkpoint", map_location)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path}: not an isda checkpoint (no 'model' state dict)")
    return state


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``model.load_state_dict(state)`` with a one-line CheckpointError when the architecture or the
    class count differs (instead of PyTorch's multi-line report)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        example = f"e.g. missing {missing[0]!r}" if missing else f"e.g. unexpected {unexpected[0]!r}"
        raise CheckpointError(f"{source} does not fit this model (different architecture): "
                              f"{len(missing)} missing and {len(unexpected)} unexpected keys, {example}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise CheckpointError(
                f"{source} does not fit this model (different architecture or class count): "
                f"{key} is {tuple(value.shape)} in the checkpoint, {tuple(own[key].shape)} in the model")
    model.load_state_dict(state)


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and current CUDA device) generator states as tensors/primitives
    (weights_only-safe)."""
    version, py_state, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    # The current GPU only: get_rng_state_all() would open a context on every visible GPU in every process.
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state(("MT19937", nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
