"""What the checks and measurements share: the problem sizes, the report they fill, a failed condition, and
timing / comparison helpers that synchronise with the device."""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# The tables' precision names -> train.amp values.
AMP = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}


class CheckFailed(AssertionError):
    """A check's condition did not hold (the message says which and by how much)."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


@dataclass
class Sizes:
    """Problem sizes: the real ones on a GPU, tiny ones for the CPU smoke test (``--quick``)."""

    encoder_shapes: tuple[tuple[int, int], ...]  # levels of an R50 encoder's value table
    step_size: tuple[int, int]  # one training step (precision comparison)
    shapes_train: int  # images in the generated training set
    tiny_steps: int
    tiny_batch: int
    r50_steps: int
    r50_side: int  # the R50 run's image side
    infer_size: tuple[int, int]
    train_size: tuple[int, int]
    infer_batches: tuple[int, ...]
    train_batches: tuple[int, ...]
    repeats: int
    ddp_steps: int
    precisions: tuple[str, ...]  # of the throughput tables
    big_preset: str  # the model of the step, throughput and profile sections (the paper's, except in --quick)


FULL = Sizes(encoder_shapes=((168, 168), (84, 84), (42, 42), (21, 21)),  # 1333x1333 padded to 1344
             step_size=(512, 512), shapes_train=512, tiny_steps=300, tiny_batch=8, r50_steps=200, r50_side=320,
             infer_size=(800, 1333), train_size=(800, 1216), infer_batches=(1, 8), train_batches=(2, 4),
             repeats=10, ddp_steps=40, precisions=("fp32", "bf16"), big_preset="isda_r50_coco")
QUICK = Sizes(encoder_shapes=((24, 24), (12, 12), (6, 6), (3, 3)), step_size=(96, 96), shapes_train=16,
              tiny_steps=6, tiny_batch=2, r50_steps=4, r50_side=64, infer_size=(96, 128), train_size=(96, 96),
              infer_batches=(1,), train_batches=(2,), repeats=1, ddp_steps=4, precisions=("fp32",),
              big_preset="isda_tiny")


@dataclass
class Report:
    device: torch.device
    checks: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def check(self, name: str, fn: Callable[[], str]) -> None:
        """Run one check; a failure (or any error) is recorded with its first line, and the rest go on."""
        print(f"[gpu-check] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception as e:  # every failure becomes a row; the traceback goes to stderr
            traceback.print_exc()
            detail, ok = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", False
        seconds = time.perf_counter() - start
        self.checks.append({"name": name, "ok": ok, "detail": detail, "seconds": round(seconds, 1)})
        print(f"[gpu-check] {name}: {'ok' if ok else 'FAILED'} ({seconds:.1f} s) {detail}", flush=True)
        empty_cache(self.device)

    def measure(self, table: str, fn: Callable[[], list[dict[str, Any]]]) -> None:
        """A measurement section: its rows go into a table; an error is a failed check of that name."""
        def run() -> str:
            rows = fn()
            self.tables[table] = rows
            return f"{len(rows)} rows"
        self.check(f"measure: {table}", run)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds per call (synchronised), after min(2, repeats) warm-up calls."""
    for _ in range(min(2, repeats)):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (scale-free error of a against the reference b)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def targets_for(name: str, targets: list[dict[str, torch.Tensor]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    if name.startswith("ISDA"):
        return [{"labels": t["labels"].to(device), "masks": t["masks"].to(device)} for t in targets]
    # Mask R-CNN: class 0 is the background, masks as uint8, boxes.
    return [{"labels": t["labels"].to(device) + 1, "masks": t["masks"].to(device, torch.uint8),
             "boxes": t["boxes"].to(device)} for t in targets]


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
