"""Before/after of each CPU optimisation, ISDA-R50 at 800 x 1216 (inference) and one training step
(batch 2, 512 x 512): one model in one process, configurations alternated run by run.

Configuration k has the first k changes of :data:`benchmarks.baseline.CHANGES` applied and the others
reverted to the straightforward code (k = 0: ISDA before any optimisation); each change's ratio is
configuration k / configuration k-1.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from . import baseline
from .common import INFER_SIZE, TRAIN_SIZE, alternate, build_isda, random_image, shapes_batch


def _configs() -> list[tuple[str, list[str]]]:
    names = list(baseline.CHANGES)
    return [("+".join(["baseline", *names[:k]]) if k else "baseline", names[k:]) for k in range(len(names) + 1)]


def _infer(model, images, revert):
    with baseline.reverted(revert), torch.no_grad():
        model(images)


def _train_step(model, optimizer, images, targets, revert):
    with baseline.reverted(revert):
        optimizer.zero_grad(set_to_none=True)
        model(images, targets)["loss"].backward()
        optimizer.step()


def run(repeats: int = 5, infer_size=INFER_SIZE, train_size=TRAIN_SIZE, preset: str = "isda_r50_coco",
        train: bool = True, log=print) -> dict[str, Any]:
    configs = _configs()
    results: dict[str, Any] = {"changes": list(baseline.CHANGES), "descriptions": baseline.DESCRIPTIONS,
                               "size": list(infer_size), "train_size": list(train_size)}
    model = build_isda(preset).eval()
    images = [random_image(infer_size)]
    stats = alternate({name: functools.partial(_infer, model, images, revert) for name, revert in configs}, repeats)
    results["inference"] = stats
    log("  inference: " + ", ".join(f"{n} {s['median']:.3f} s" for n, s in stats.items()))
    if train:
        model = build_isda(preset).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
        images, targets = shapes_batch(train_size, batch=2, num_classes=model.cfg.num_classes)
        stats = alternate({name: functools.partial(_train_step, model, optimizer, images, targets, revert)
                           for name, revert in configs}, repeats)
        results["train"] = stats
        log("  train step: " + ", ".join(f"{n} {s['median']:.3f} s" for n, s in stats.items()))
    return results
