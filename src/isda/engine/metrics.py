"""The run's metrics.jsonl (one JSON object per line, written by rank 0 only): train rows (means since the
last row), skip rows, validation rows; and the peak memory the progress bar shows."""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_write_text


class MetricsLog:
    """Appends rows to ``path`` when ``enabled`` (rank 0); averages the train values between train rows."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.window: dict[str, float] = {}  # sums of the logged values since the last train row
        self.count = 0

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            # null instead of NaN/Infinity (e.g. an fp16 overflow's grad norm): those are not JSON.
            row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def accumulate(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.window[k] = self.window.get(k, 0.0) + v
        self.count += 1

    def write_means(self, head: dict[str, Any], tail: dict[str, Any]) -> None:
        """One row: ``head``, the means of the values accumulated since the last such row, ``tail``."""
        self.write({**head, **{k: v / self.count for k, v in self.window.items()}, **tail})
        self.window, self.count = {}, 0

    def trim(self, step: int) -> None:
        """Keep the rows up to ``step``: after a resume, rows logged past the checkpoint would repeat (and a
        row cut short by a crash is dropped)."""
        if not self.enabled or not self.path.exists():
            return

        def keep(line: str) -> bool:
            try:
                return json.loads(line)["iter"] <= step
            except (ValueError, KeyError, TypeError):
                return False

        atomic_write_text(self.path, "".join(line + "\n" for line in self.path.read_text().splitlines() if keep(line)))


def memory_gb(device: torch.device) -> float:
    """Peak memory: CUDA allocations on GPU, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
