"""Reading weights files safely: the one ``torch.load(weights_only=True)`` of the package (checkpoints,
backbone weights, Deformable-DETR files) and the one error type of every weights loader."""

from __future__ import annotations

import argparse
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..fileio import first_line


class WeightsError(ValueError):
    """A weights file (checkpoint, backbone weights, Deformable-DETR checkpoint) is missing, unreadable or
    does not fit the model: one line that names the file."""


def load_torch_file(path: str | os.PathLike, name: str, kind: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: no pickled code runs. A missing file or any failure is a
    one-line WeightsError naming the file: "<name> not found: <path>", "<path>: not a <kind> (<why>)"."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{name} not found: {path}")
    try:
        # Deformable-DETR checkpoints carry their argparse options ("args"): a harmless plain-attribute class.
        # torch warns about a plain pickle's protocol, asking for an issue: noise for a user.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, pickled code, not a torch file
        raise WeightsError(f"{path}: not a {kind} ({_why_unreadable(e)})") from None


def _why_unreadable(e: Exception) -> str:
    """torch's refusal of pickled code advises retrying with weights_only=False: never repeat that advice."""
    text = str(e)
    if "Weights only load failed" not in text:
        return f"{type(e).__name__}: {first_line(e)}"
    found = re.search(r"GLOBAL ([\w.]+)", text)
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    what = (f"the Python object {found.group(1)}" if found
            else f"pickle content ({detail.group(1).strip()})" if detail else "pickle content")
    return (f"refused to unpickle {what}: weights are read with weights_only=True, only tensors and plain "
            "containers are accepted")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict (str -> Tensor) inside a weights file, read without running pickled code.

    ``.safetensors`` files are read with safetensors; everything else with ``torch.load(weights_only=True)``.
    Containers ``{"state_dict": ...}`` (mmdetection), ``{"model": ...}`` (Deformable-DETR, our trainer)
    are unwrapped and a DistributedDataParallel ``module.`` prefix is removed.
    """
    p = Path(path)
    if p.is_dir():  # a Hugging Face model folder
        found = [p / n for n in ("model.safetensors", "pytorch_model.bin") if (p / n).is_file()]
        if not found:
            raise WeightsError(f"{p}: folder without model.safetensors or pytorch_model.bin")
        p = found[0]
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p}")
    if p.name.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise WeightsError(f"{p}: reading .safetensors files needs the 'safetensors' package "
                               "(pip install safetensors)") from None
        try:
            obj = load_file(str(p), device="cpu")
        except Exception as e:  # truncated, not a safetensors file
            raise WeightsError(f"{p}: not a readable safetensors file ({type(e).__name__}: {first_line(e)})") from None
    else:
        obj = load_torch_file(p, "weights file", "loadable torch weights file")
    return unwrap_state_dict(obj, str(p))


def unwrap_state_dict(obj: Any, where: str = "checkpoint") -> dict[str, Tensor]:
    """A checkpoint object -> its state dict (see :func:`read_checkpoint`)."""
    state = None
    if _is_state_dict(obj):
        state = obj
    elif isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if _is_state_dict(obj.get(key)):
                state = obj[key]
                break
    if state is None:
        if isinstance(obj, Mapping):
            shown = ", ".join(repr(k) for k in list(obj)[:6])
            raise WeightsError(f"{where}: no state dict of tensors found (top-level keys: {shown or 'none'})")
        raise WeightsError(f"{where}: expected a state dict, got {type(obj).__name__}")
    state = dict(state)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()))
