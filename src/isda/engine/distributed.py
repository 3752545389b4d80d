"""torch.distributed helpers for ``torchrun`` launches; every helper is a no-op in a single process.

``torchrun --nproc_per_node=N`` sets RANK, WORLD_SIZE and LOCAL_RANK; :func:`init_distributed` reads
them, picks the device (``cuda:LOCAL_RANK`` when CUDA is used) and the backend (nccl on GPU, gloo on
CPU). Collectives take tensors on the training device, because nccl only moves CUDA tensors.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_backend() -> str | None:
    return dist.get_backend() if is_distributed() else None


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(device: str | None = None) -> torch.device:
    """Join the process group described by the environment (if any) and return this process's device.

    ``device``: "cuda", "cpu", "cuda:1"... or None for cuda when available, else cpu. Under torchrun
    with CUDA every process takes the GPU of its LOCAL_RANK.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # A torchrun launch joins its process group even with one process (DDP over nccl/gloo as with more).
    launched = world_size > 1 or ("RANK" in os.environ and "MASTER_ADDR" in os.environ)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available (use device='cpu')")
    if launched:
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        if not is_distributed():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev


def cleanup_distributed() -> None:
    """Leave the process group and free it now, not at interpreter exit.

    A gloo worker thread drops its last reference to a finished collective's tensors a moment after the
    caller's ``wait`` returns; if that falls into interpreter shutdown, the thread cannot take the GIL and the
    process aborts ("terminate called without an active exception"). Freeing the group here (garbage first:
    a DDP model that is no longer used still holds it; again after, for what destroying it left in reference
    cycles: the thread check in tests/test_distributed.py fails without either) joins those threads while Python is
    alive."""
    if is_distributed():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Mean of ``tensor`` over processes (a new tensor; the input is left alone)."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out)
        out /= get_world_size()
    return out


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every process, so that all processes take the same branch (e.g. stop now)."""
    if not is_distributed():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's picklable ``obj`` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
