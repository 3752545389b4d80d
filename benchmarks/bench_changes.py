"""Before/after of the CPU optimisations as a whole: ISDA inference at 800 x 1216 and one training step (batch
2, 512 x 512), this tree against the code of a git revision, each side in its own worker process, alternated
run by run (:func:`benchmarks.procs.compare`).

The "before" side is a revision of this repository (:data:`BEFORE_OPTIMISATIONS` by default: the last one
before the first optimisation), extracted with ``git archive``; no copy of old code lives next to the new.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .common import INFER_SIZE, TRAIN_SIZE
from .procs import ROOT, compare

# The last revision before the CPU optimisations (grid_sample deformable attention, NCHW everywhere, ...).
BEFORE_OPTIMISATIONS = "929957d"


@contextlib.contextmanager
def source_of(revision: str) -> Iterator[Path]:
    """The ``src`` folder of ``revision`` of this repository, extracted into a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="isda-src-") as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "src"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield Path(tmp) / "src"


def describe(revision: str = "HEAD") -> str:
    """Short hash of a revision (``HEAD``: with ``-dirty`` when the working tree has changes)."""
    args = ["describe", "--always", "--dirty"] if revision == "HEAD" else ["rev-parse", "--short", revision]
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def run(before: str = BEFORE_OPTIMISATIONS, repeats: int = 5, infer_size=INFER_SIZE, train_size=TRAIN_SIZE,
        preset: str = "isda_r50_coco", threads: int = 2, train: bool = True, log=print) -> dict[str, Any]:
    """Median time of each side and the ratio after / before, for inference and (``train``) a training step."""
    results: dict[str, Any] = {"before": describe(before), "after": describe(), "preset": preset,
                               "size": list(infer_size), "train_size": list(train_size)}
    tasks = {"inference": ["--task", "infer", "--size", "x".join(map(str, infer_size))]}
    if train:
        tasks["train"] = ["--task", "train", "--size", "x".join(map(str, train_size)), "--batch", "2"]
    with source_of(before) as src:
        for part, task in tasks.items():
            args = [*task, "--threads", str(threads), "--model", "isda", "--preset", preset]
            res = compare({"before": args, "after": args}, repeats=repeats, sources={"before": src}, log=log)
            res["ratio"] = res["after"]["time"]["median"] / res["before"]["time"]["median"]
            log(f"  {part}: after / before {res['ratio']:.2f}")
            results[part] = res
    return results
