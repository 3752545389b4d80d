"""What would bring ISDA-R50 inference further down: changes *outside* the optimised files, measured by
patching them in for the duration of the benchmark only (nothing here is applied to the library).

* ``frozen_bn_single_pass``: the backbone's FrozenBatchNorm2d (torchvision) computes ``x * scale + bias``,
  two full passes over every activation (plus four small ops); ``F.batch_norm`` in eval mode is one pass
  and gives bit-identical results.
* ``ffn_inplace_relu``: the transformer FFN's ``torch.relu`` allocates and writes a second
  tokens x 1024 tensor per layer; ``relu_`` on the linear's output does not.

Configurations are cumulative and alternated run by run in one process, like :mod:`benchmarks.bench_changes`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import FrozenBatchNorm2d

import isda.transformer

from .common import INFER_SIZE, alternate, build_isda, random_image


def _frozen_bn_forward(self, x):
    return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _ffn_forward(self, x):
    return self.norm(x + self.dropout2(self.linear2(self.dropout1(torch.relu_(self.linear1(x))))))


PATCHES = {
    "frozen_bn_single_pass": (FrozenBatchNorm2d, "forward", _frozen_bn_forward),
    "ffn_inplace_relu": (isda.transformer.FFN, "forward", _ffn_forward),
}


@contextlib.contextmanager
def patched(names: list[str]) -> Iterator[None]:
    saved = []
    try:
        for name in names:
            obj, attr, value = PATCHES[name]
            saved.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def _infer(model, images, names):
    with patched(names), torch.no_grad():
        model(images)


def run(repeats: int = 5, infer_size=INFER_SIZE, preset: str = "isda_r50_coco", log=print) -> dict[str, Any]:
    names = list(PATCHES)
    configs = {"current": []}
    for k in range(1, len(names) + 1):
        configs["+".join(["current", *names[:k]])] = names[:k]
    model = build_isda(preset).eval()
    images = [random_image(infer_size)]
    stats = alternate({n: functools.partial(_infer, model, images, p) for n, p in configs.items()}, repeats)
    log("  what-if: " + ", ".join(f"{n} {s['median']:.3f} s" for n, s in stats.items()))
    return {"patches": names, "descriptions": {n: PATCHES[n][0].__qualname__ + "." + PATCHES[n][1] for n in names},
            "inference": stats}
