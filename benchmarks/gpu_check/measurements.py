"""The measurements (tables on the page): inference and training throughput of ISDA and Mask R-CNN, the
deformable attention core's implementations, and a kernel profile."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from isda.engine.amp import autocast
from isda.ops import ms_deform_attn

from ..common import build_isda, build_maskrcnn, limit_candidates, msda_problem, reference_ms_deform_attn, shapes_batch
from .harness import AMP, Sizes, empty_cache, last_line, median_time, peak_gib, reset_peak, sync, targets_for


def _maskrcnn(frozen: bool, size: tuple[int, int]) -> torch.nn.Module:
    """Mask R-CNN that keeps ``size`` as it is (no resize to 800) and sends 100 detections to its mask head."""
    return limit_candidates(build_maskrcnn(frozen=frozen, min_size=min(size), max_size=max(size),
                                           box_detections_per_img=100))


def measure_inference(device: torch.device, sizes: Sizes) -> list[dict[str, Any]]:
    rows = []
    models = {f"ISDA {sizes.big_preset}": lambda: build_isda(sizes.big_preset), "Mask R-CNN R50-FPN": lambda: _maskrcnn(False, sizes.infer_size)}
    for name, build in models.items():
        model = build().to(device).eval()
        for batch in sizes.infer_batches:
            images = [torch.rand(3, *sizes.infer_size, device=device) for _ in range(batch)]
            for precision, channels_last in [(p, False) for p in sizes.precisions] + [("bf16", True)] * (
                    "bf16" in sizes.precisions):
                model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

                def forward() -> None:
                    with torch.no_grad(), autocast(device, AMP[precision]):
                        model(images)

                reset_peak(device)
                try:
                    seconds = median_time(forward, device, sizes.repeats)
                except Exception as e:  # a baseline that cannot run a mode is a note, not a failed check of ours
                    if name.startswith("ISDA"):
                        raise
                    rows.append({"model": name, "batch": batch, "precision": precision,
                                 "channels-last": channels_last, "error": last_line(str(e))})
                    continue
                rows.append({"model": name, "batch": batch, "precision": precision, "channels-last": channels_last,
                             "ms/batch": round(seconds * 1e3, 1), "images/s": round(batch / seconds, 1),
                             "peak GiB": _round(peak_gib(device))})
        del model
        empty_cache(device)
    return rows


def measure_training(device: torch.device, sizes: Sizes) -> list[dict[str, Any]]:
    """One optimizer step (forward, backward, AdamW) at the training size, the same frozen-backbone recipe
    for both models (FrozenBatchNorm, stem + stage 1 frozen)."""
    rows = []
    batches = {b: shapes_batch(sizes.train_size, batch=b, seed=b, num_classes=5) for b in sizes.train_batches}
    models = {f"ISDA {sizes.big_preset}": lambda: build_isda(sizes.big_preset), "Mask R-CNN R50-FPN": lambda: _maskrcnn(True, sizes.train_size)}
    for name, build in models.items():
        model = build().to(device).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        for batch, (images, targets) in batches.items():
            images = [im.to(device) for im in images]
            targets = targets_for(name, targets, device)
            for precision in sizes.precisions:

                def step() -> None:
                    optimizer.zero_grad(set_to_none=True)
                    with autocast(device, AMP[precision]):
                        losses = model(images, targets)
                    loss = losses["loss"] if "loss" in losses else sum(losses.values())
                    loss.backward()
                    optimizer.step()

                reset_peak(device)
                seconds = median_time(step, device, sizes.repeats)
                rows.append({"model": name, "batch": batch, "precision": precision,
                             "ms/step": round(seconds * 1e3, 1), "images/s": round(batch / seconds, 1),
                             "peak GiB": _round(peak_gib(device))})
        del model, optimizer
        empty_cache(device)
    return rows


def measure_msda(device: torch.device, sizes: Sizes) -> list[dict[str, Any]]:
    """The core alone at an 800x1216 encoder's size (every token a query): the two implementations and the
    textbook one, forward and forward + backward."""
    shapes = tuple((math.ceil(sizes.infer_size[0] / s), math.ceil(sizes.infer_size[1] / s)) for s in (8, 16, 32, 64))
    S = sum(h * w for h, w in shapes)
    inputs = [t.to(device) for t in msda_problem(S, shapes=shapes, batch=1, seed=4)]
    rows = []
    impls = {"grid_sample": lambda *a: ms_deform_attn(*a, impl="grid_sample"),
             "gather": lambda *a: ms_deform_attn(*a, impl="gather"), "textbook": reference_ms_deform_attn}
    for name, fn in impls.items():
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]

        def forward() -> None:
            with torch.no_grad():
                fn(*leaves)

        def forward_backward() -> None:
            fn(*leaves).sum().backward()

        rows.append({"implementation": name, "queries": S, "forward ms": round(median_time(forward, device, sizes.repeats) * 1e3, 2),
                     "forward+backward ms": round(median_time(forward_backward, device, sizes.repeats) * 1e3, 2)})
    return rows


def _isda_steps(device: torch.device, sizes: Sizes, precision: str,
                optimize: bool) -> tuple[Callable[[], None], Callable[[], None]]:
    """The R50 model's two workloads under ``precision``: inference on one image at the inference size, and a
    training step at batch 2 at the training size (with an AdamW step when ``optimize``)."""
    model = build_isda(sizes.big_preset).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5) if optimize else None
    images, targets = shapes_batch(sizes.train_size, batch=2, seed=0, num_classes=5)
    images = [im.to(device) for im in images]
    targets = targets_for("ISDA", targets, device)
    infer_images = [torch.rand(3, *sizes.infer_size, device=device)]

    def infer() -> None:
        model.eval()
        with torch.no_grad(), autocast(device, AMP[precision]):
            model(infer_images)

    def train_step() -> None:
        model.train()
        with autocast(device, AMP[precision]):
            loss = model(images, targets)["loss"]
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    return infer, train_step


def measure_core_in_model(device: torch.device, sizes: Sizes) -> list[dict[str, Any]]:
    """The whole R50 model with its attention core forced to each implementation (what ``impl="auto"`` should
    pick on this device): inference at batch 1 and a training step at batch 2, both at the table's last
    precision (bf16 on a GPU)."""
    from functools import partial
    from unittest import mock

    import isda.models.deformable_attention as attention

    precision = sizes.precisions[-1]
    infer, train_step = _isda_steps(device, sizes, precision, optimize=True)
    rows = []
    for impl in ("grid_sample", "gather"):
        with mock.patch.object(attention, "ms_deform_attn", partial(ms_deform_attn, impl=impl)):
            rows.append({"core": impl, "precision": precision,
                         "inference ms (batch 1)": round(median_time(infer, device, sizes.repeats) * 1e3, 1),
                         "training step ms (batch 2)": round(median_time(train_step, device, sizes.repeats) * 1e3, 1)})
    return rows


def measure_profile(device: torch.device, sizes: Sizes) -> list[dict[str, Any]]:
    """Kernel time by operator for one bf16 R50 forward at the inference size and one training step, and the
    share of the deformable attention core (its grid_sample kernels)."""
    from torch.profiler import ProfilerActivity, profile

    infer, train_step = _isda_steps(device, sizes, "bf16", optimize=False)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    rows = []
    for label, fn in (("inference, batch 1", infer), ("training step, batch 2", train_step)):
        fn()
        sync(device)
        with profile(activities=[activity]) as prof:
            fn()
            sync(device)
        events = [e for e in prof.key_averages() if _self_time(e) > 0]
        total = sum(_self_time(e) for e in events)
        core = sum(_self_time(e) for e in events if "grid_sampler" in e.key)
        rows.append({"run": label, "operator": "(all kernels)", "ms": round(total / 1e3, 2), "share": 1.0})
        rows.append({"run": label, "operator": "deformable attention core (grid_sampler*)",
                     "ms": round(core / 1e3, 2), "share": round(core / total, 3)})
        for e in sorted(events, key=_self_time, reverse=True)[:8]:
            rows.append({"run": label, "operator": e.key[:70], "ms": round(_self_time(e) / 1e3, 2),
                         "share": round(_self_time(e) / total, 3)})
    return rows


def _self_time(event: Any) -> float:
    """Microseconds of the event's own device (or CPU) time."""
    for attr in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        value = getattr(event, attr, None)
        if value:
            return float(value)
    return 0.0


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)
