"""A benchmark worker: one model in a fresh process, driven line by line over stdin/stdout (JSON).

The parent (:class:`benchmarks.procs.Worker`) keeps one worker per model alive and alternates them
(``run`` to ISDA, ``run`` to Mask R-CNN, ...), so that machine noise hits both sides alike while each
model's peak memory (``ru_maxrss``) stays its own.

Commands: ``run`` (one timed inference or training step), ``components`` (one inference with a
per-component breakdown from forward hooks: no change to the models; then one under torch.profiler, split by
operator class), ``stats`` (peak RSS), ``quit``.

``--precision bf16`` runs both (every model, both tasks) under the same generic switch, CPU autocast to bfloat16
(``torch.autocast("cpu", dtype=torch.bfloat16)``, what ``isda predict --precision bf16`` and ``train.amp=bf16``
use): convolutions and matrix products in bfloat16, each model keeping in float32 what autocast and the model
itself keep there.

    python -m benchmarks.worker --task infer --model isda --size 800x1216 --threads 2 [--precision bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from .common import (
    COPY_OPS,
    DENSE_OPS,
    MASKRCNN_INFER_KWARGS,
    MSDA_GATHER_OPS,
    build_isda,
    build_maskrcnn,
    limit_candidates,
    peak_rss_gib,
    random_image,
    set_threads,
    shapes_batch,
    with_isda_speedups,
)


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def _time_spans(model: torch.nn.Module, images: list[torch.Tensor],
                spans: dict[str, tuple[torch.nn.Module, ...]]) -> tuple[dict[str, float], dict[str, float]]:
    """One no-grad inference with forward hooks on each span (its first module's start to its last module's
    end). Returns the seconds per span, 'total' (the whole model) included, and the raw time marks."""
    marks: dict[str, float] = {}

    def mark(key: str) -> Callable[..., None]:
        return lambda *_: marks.__setitem__(key, time.perf_counter())

    handles = []
    for name, modules in {"total": (model,), **spans}.items():
        handles.append(modules[0].register_forward_pre_hook(mark(name + ".start")))
        handles.append(modules[-1].register_forward_hook(mark(name + ".end")))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return {k: marks[k + ".end"] - marks[k + ".start"] for k in ("total", *spans)}, marks


def op_classes(model: torch.nn.Module, images: list[torch.Tensor]) -> dict[str, float]:
    """One no-grad inference under torch.profiler; self CPU seconds of the matrix products and convolutions
    (``ops_dense``), of the deformable attention core (``ops_core``), of copies and dtype casts (``ops_copy``)
    and of every operator (``ops_total``): what bounds a latency goal once the dense work runs at the
    machine's rate."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(images)
    self_s = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    out = {f"ops_{name}": sum(self_s.get(op, 0.0) for op in ops)
           for name, ops in (("dense", DENSE_OPS), ("core", MSDA_GATHER_OPS), ("copy", COPY_OPS))}
    out["ops_total"] = sum(self_s.values())
    return out


def isda_components(model: torch.nn.Module, images: list[torch.Tensor]) -> dict[str, float]:
    """One inference; seconds in backbone, neck, encoder, decoder, mask features, then dynamic masks +
    post-processing (head, 1x1 dynamic convolution, top-k, upsampling, boxes) and the rest."""
    t = model.transformer
    out, marks = _time_spans(model, images, {
        "backbone": (model.backbone,), "neck": (model.neck,), "encoder": (t.encoder[0], t.encoder[-1]),
        "decoder": (t.decoder[0], t.decoder[-1]), "mask_features": (model.mask_features,)})
    out["dynamic_masks_postprocess"] = marks["total.end"] - marks["mask_features.end"]
    out["other"] = out["total"] - sum(v for k, v in out.items() if k != "total")
    return out


def maskrcnn_components(model: torch.nn.Module, images: list[torch.Tensor]) -> dict[str, float]:
    """One inference; seconds in backbone + FPN, RPN, RoI heads (box head, per-class NMS, mask head) and
    the rest (normalize/resize, pasting the 28 x 28 masks into the image)."""
    r = model.roi_heads
    out, _ = _time_spans(model, images, {"backbone_fpn": (model.backbone,), "rpn": (model.rpn,), "roi_heads": (r,),
                                         "box_head": (r.box_head,), "mask_head": (r.mask_head,)})
    out["other"] = out["total"] - out["backbone_fpn"] - out["rpn"] - out["roi_heads"]
    return out


class Task:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        size = parse_size(args.size)
        if args.task == "infer":
            self.images = [random_image(size, seed=args.seed)]
            if args.model == "isda" and args.weights:
                from isda.inference import load_trained_model

                self.model = load_trained_model(args.weights).model
            elif args.model == "isda":
                self.model = build_isda(args.preset, seed=args.seed).eval()
            elif args.model == "isda_onnx":  # an `isda export` file in ONNX Runtime (benchmarks/bench_onnx.py)
                from isda.deploy.runtime import OnnxISDA

                self.model = OnnxISDA(args.onnx, threads=args.threads, runtime=args.runtime)
            else:
                kwargs = dict(MASKRCNN_INFER_KWARGS)
                kwargs["min_size"], kwargs["max_size"] = min(size), max(max(size), kwargs["max_size"])
                self.model = limit_candidates(build_maskrcnn(seed=args.seed, frozen=args.model == "maskrcnn_frozen",
                                                             **kwargs)).eval()
                if args.speedups:
                    with_isda_speedups(self.model)
        else:
            if args.model == "isda":
                self.model = build_isda(args.preset, seed=args.seed).train()
                num_classes = self.model.cfg.num_classes
            else:
                # Train at the given size as is (no resize to 800), like ISDA.
                self.model = build_maskrcnn(seed=args.seed, frozen=args.model == "maskrcnn_frozen",
                                            min_size=min(size), max_size=max(size)).train()
                num_classes = 90
            self.images, targets = shapes_batch(size, batch=args.batch, seed=args.seed, num_classes=num_classes)
            if args.model != "isda":
                for t in targets:
                    t["labels"] = t["labels"] + 1  # 0 is Mask R-CNN's background
                    t["masks"] = t["masks"].to(torch.uint8)
            self.targets = targets
            if args.speedups:  # Mask R-CNN only (main refuses it for ISDA)
                with_isda_speedups(self.model)
            params = [p for p in self.model.parameters() if p.requires_grad]
            # Fused, as the trainer's (isda.engine.adamw), for both models; spelled out here because this worker
            # also runs against older revisions of the package (benchmarks.bench_changes).
            self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, fused=True)

    def precision(self) -> contextlib.AbstractContextManager:
        """The forward pass's precision; the backward and the optimizer step follow the forward's dtypes."""
        if self.args.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run(self) -> float:
        start = time.perf_counter()
        if self.args.task == "infer":
            with torch.no_grad(), self.precision():
                out = self.model(self.images)
            self.detections = len(out[0]["scores"])
        else:
            self.optimizer.zero_grad(set_to_none=True)
            with self.precision():
                losses = self.model(self.images, self.targets)
            loss = losses["loss"] if "loss" in losses else sum(losses.values())
            loss.backward()
            self.optimizer.step()
        return time.perf_counter() - start

    def components(self) -> dict[str, float]:
        with self.precision():
            spans = (isda_components if self.args.model == "isda" else maskrcnn_components)(self.model, self.images)
            return {**spans, **op_classes(self.model, self.images)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["infer", "train"], required=True)
    p.add_argument("--model", choices=["isda", "isda_onnx", "maskrcnn", "maskrcnn_frozen"], required=True)
    p.add_argument("--weights", help="isda: a trained checkpoint instead of the preset's random initialisation")
    p.add_argument("--onnx", help="isda_onnx: the .onnx file")
    p.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime",
                   help="isda_onnx: what runs the file")
    p.add_argument("--size", default="800x1216", help="HxW")
    p.add_argument("--preset", default="isda_r50_coco")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speedups", action="store_true", help="Mask R-CNN: ISDA's generic CPU speed-ups "
                   "(benchmarks.common.with_isda_speedups: BatchNorm folding, channels-last inference); ISDA has them")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: the forward pass under CPU autocast to bfloat16, for every model alike")
    args = p.parse_args(argv)
    if args.speedups and args.model.startswith("isda"):
        p.error("--speedups is for the Mask R-CNN models (ISDA has these speed-ups built in)")
    if args.precision == "bf16" and args.model == "isda_onnx":
        p.error("--precision bf16 is for the PyTorch models (an ONNX export runs in float32)")
    set_threads(args.threads)
    start = time.perf_counter()
    task = Task(args)
    reply({"ready": True, "build_s": time.perf_counter() - start, "rss_gib_after_build": peak_rss_gib()})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            reply({"seconds": task.run(), "detections": getattr(task, "detections", None)})
        elif cmd == "components":
            reply({"components": task.components()})
        elif cmd == "stats":
            reply({"peak_rss_gib": peak_rss_gib()})
        elif cmd == "quit":
            break
        elif cmd:
            reply({"error": f"unknown command {cmd!r}"})


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
