"""The deformable attention core: ``isda.ops.ms_deform_attn`` against the textbook implementation
(:func:`benchmarks.common.reference_ms_deform_attn`) and the previous ISDA implementation
(``impl="grid_sample"``: per-level grid_sample, accumulated), forward and forward + backward, at the
paper's sizes: 4 levels of an 800 x 1216 image, 8 heads x 32 dims, 4 points, batch 1; encoder
(every token is a query, 20,197) and decoder (300 queries)."""

from __future__ import annotations

import functools
from typing import Any

import torch

from isda.ops import ms_deform_attn

from .common import MSDA_SHAPES, alternate, msda_problem, reference_ms_deform_attn

IMPLEMENTATIONS = {
    "isda": ms_deform_attn,  # impl="auto": the gather implementation on CPU
    "reference": reference_ms_deform_attn,
    "isda_grid_sample": functools.partial(ms_deform_attn, impl="grid_sample"),  # before the optimisation
}


def run(repeats: int = 5, shapes=MSDA_SHAPES, queries: dict[str, int] | None = None, log=print) -> dict[str, Any]:
    impls = IMPLEMENTATIONS
    tokens = sum(h * w for h, w in shapes)
    queries = queries or {"encoder": tokens, "decoder": 300}
    results: dict[str, Any] = {"shapes": [list(s) for s in shapes], "queries": queries, "cases": {}}
    for case, q in queries.items():
        value, ss, loc, w = msda_problem(q, shapes)
        fwd = {name: functools.partial(_forward, fn, value, ss, loc, w) for name, fn in impls.items()}
        value_g, _, loc_g, w_g = msda_problem(q, shapes, requires_grad=True)
        grad = torch.randn(1, q, value.shape[2] * value.shape[3], generator=torch.Generator().manual_seed(1))
        bwd = {name: functools.partial(_forward_backward, fn, value_g, ss, loc_g, w_g, grad)
               for name, fn in impls.items()}
        for mode, fns in (("forward", fwd), ("forward_backward", bwd)):
            stats = alternate(fns, repeats)
            results["cases"][f"{case}/{mode}"] = stats
            ref = stats["reference"]["median"]
            log(f"  ms_deform_attn {case} ({q} queries) {mode}: " + ", ".join(
                f"{n} {s['median'] * 1e3:.1f} ms (x{ref / s['median']:.2f})" for n, s in stats.items()))
    return results


@torch.no_grad()
def _forward(fn, value, ss, loc, w):
    return fn(value, ss, loc, w)


def _forward_backward(fn, value, ss, loc, w, grad):
    for t in (value, loc, w):
        t.grad = None
    fn(value, ss, loc, w).backward(grad)
