"""GPU readiness: one command that checks and measures the CUDA path (``make gpu-check``).

    python -m benchmarks.gpu_check                       # on a CUDA machine: writes docs/gpu.md
    python -m benchmarks.gpu_check --device cpu --quick  # smoke test of this script (the test suite runs it)

Checks (each one a pass/fail row; the script exits 1 if any fails):
  * ``ms_deform_attn`` on the device against the float64 CPU textbook implementation (forward and the three
    gradients, both implementations), the attention module under bf16/fp16 autocast (the core stays float32),
    and the value table of an R50 encoder at 1333x1333 (grid_sample against gather on the device);
  * one ``isda_r50_coco`` training step in fp32, bf16 and fp16 + grad scaler: finite losses, gradients close
    to fp32's;
  * short training runs through ``isda.engine.train`` on the shapes dataset (the tiny preset and the R50
    architecture at a reduced size, bf16): the loss falls;
  * ``torchrun --nproc_per_node=1`` (nccl on CUDA, gloo on CPU): train, checkpoint, resume;
  * the tiny model exported to ONNX and run by ONNX Runtime's CUDA provider: PyTorch's detections.
Measurements (tables on the page): R50 inference images/s at 800x1333 (fp32, bf16, bf16 + channels-last),
training images/s and peak memory at batch 2 and 4, the same for torchvision Mask R-CNN R50-FPN in the same
run, the deformable-attention core's two implementations, and a kernel profile of the bf16 forward and
training step (what share the core takes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision

from isda.config import apply_overrides, get_preset
from isda.data.shapes import make_shapes_dataset
from isda.engine.amp import autocast
from isda.fileio import atomic_write_text
from isda.models.deformable_attention import MSDeformAttn
from isda.ops import ms_deform_attn

from .common import build_isda, build_maskrcnn, limit_candidates, msda_problem, reference_ms_deform_attn, shapes_batch

ROOT = Path(__file__).resolve().parents[1]
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
        _empty_cache(self.device)

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


# ---- helpers -------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds per call (synchronised), after min(2, repeats) warm-up calls."""
    for _ in range(min(2, repeats)):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (scale-free error of a against the reference b)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


# ---- checks: the deformable attention core ------------------------------------------------------------

def check_msda_reference(device: torch.device) -> str:
    """Both implementations on the device (float32) against the textbook one in float64 on the CPU."""
    shapes = ((19, 23), (10, 12), (5, 6), (3, 3))
    ref_inputs = msda_problem(300, shapes=shapes, batch=2, dtype=torch.float64, requires_grad=True, seed=1)
    ref = reference_ms_deform_attn(*ref_inputs)
    grad_out = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref.backward(grad_out)
    ref_grads = [ref_inputs[i].grad for i in (0, 2, 3)]
    details = []
    for impl in ("grid_sample", "gather"):
        inputs = [t.detach().to(device, torch.float32).requires_grad_(t.requires_grad) for t in ref_inputs]
        out = ms_deform_attn(*inputs, impl=impl)
        out.backward(grad_out.to(device, torch.float32))
        errors = {"output": _max_rel(out, ref)}
        errors.update({name: _max_rel(inputs[i].grad, g)
                       for name, i, g in zip(("d value", "d locations", "d weights"), (0, 2, 3), ref_grads)})
        worst = max(errors, key=errors.get)
        require(errors[worst] < 1e-4, f"{impl}: {worst} relative error {errors[worst]:.2e} >= 1e-4")
        details.append(f"{impl} worst {worst} {errors[worst]:.1e}")
    return "; ".join(details)


def check_msda_half(device: torch.device) -> str:
    """The attention module under bf16 / fp16 autocast: finite, close to float32, the core fed float32."""
    torch.manual_seed(0)
    module = MSDeformAttn(256, 4, 8, 4).to(device)
    shapes = torch.tensor(((32, 40), (16, 20), (8, 10), (4, 5)), device=device)
    S = int(shapes.prod(1).sum())
    g = torch.Generator(device=device).manual_seed(0)
    # Values of a few hundred: half-precision sums of products of such values overflow fp16 (65504).
    value = torch.randn(2, S, 256, device=device, generator=g) * 300
    query = torch.randn(2, 300, 256, device=device, generator=g)
    ref_points = torch.rand(2, 300, 4, 2, device=device, generator=g)
    with torch.no_grad():
        expected = module(query, ref_points, value, shapes)
    details = []
    for precision, tol in (("bf16", 3e-2), ("fp16", 1e-2)):
        with torch.no_grad(), autocast(device, AMP[precision]):
            out = module(query, ref_points, value, shapes)
        require(bool(torch.isfinite(out).all()), f"{precision}: non-finite output")
        err = _max_rel(out, expected)
        require(err < tol, f"{precision}: relative error {err:.2e} >= {tol}")
        details.append(f"{precision} {err:.1e}")
    return "relative error vs fp32: " + ", ".join(details)


def check_msda_large(device: torch.device, sizes: Sizes) -> str:
    """The encoder's whole value table of an R50 at 1333x1333, batch 2, forward + backward."""
    S = sum(h * w for h, w in sizes.encoder_shapes)
    inputs = [t.to(device) for t in msda_problem(S, shapes=sizes.encoder_shapes, batch=2, seed=3)]
    _reset_peak(device)
    start = time.perf_counter()
    outs = {}
    for impl in ("grid_sample", "gather"):
        leaves = [t.requires_grad_(True) if t.is_floating_point() else t for t in (x.detach() for x in inputs)]
        out = ms_deform_attn(*leaves, impl=impl)
        out.square().mean().backward()
        require(bool(torch.isfinite(out).all()) and bool(torch.isfinite(leaves[0].grad).all()),
                f"{impl}: non-finite output or gradient")
        outs[impl] = (out.detach(), leaves[0].grad)
    _sync(device)
    err = _max_rel(outs["grid_sample"][0], outs["gather"][0])
    err_grad = _max_rel(outs["grid_sample"][1], outs["gather"][1])
    require(err < 1e-5 and err_grad < 1e-4, f"implementations disagree: output {err:.1e}, d value {err_grad:.1e}")
    peak = _peak_gib(device)
    return (f"{S} tokens x {S} queries, both implementations agree (output {err:.1e}, d value {err_grad:.1e}), "
            f"{time.perf_counter() - start:.1f} s" + (f", peak {peak:.1f} GiB" if peak is not None else ""))


# ---- checks: mixed precision training step ------------------------------------------------------------

def check_amp_step(device: torch.device, sizes: Sizes) -> str:
    """One isda_r50_coco step (dropout off so that the three runs see the same network) in fp32, bf16 and fp16
    with a grad scaler, from the same weights and batch: finite, and gradients point the same way as fp32's."""
    model = build_isda(sizes.big_preset, seed=0, dropout=0.0).to(device).train()
    images, targets = shapes_batch(sizes.step_size, batch=2, seed=0, num_classes=5)
    images = [im.to(device) for im in images]
    targets = _targets_for("ISDA", targets, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)  # only for the scaler's unscale_
    results = {}
    for precision in ("fp32", "bf16", "fp16"):
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        # As in training: a step whose scaled fp16 gradients overflow is skipped and the scale halves.
        for attempt in range(1, 25):
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, AMP[precision]):
                loss = model(images, targets)["loss"]
            require(bool(torch.isfinite(loss)), f"{precision}: loss {loss.item()}")
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grads = torch.cat([p.grad.flatten().float() for p in params if p.grad is not None])
            finite = bool(torch.isfinite(grads).all())
            scaler.step(optimizer)  # lr 0: only the scaler's bookkeeping
            scaler.update()
            if finite or not scaler.is_enabled():
                break
        require(finite, f"{precision}: non-finite gradients (scale {scaler.get_scale() if scaler.is_enabled() else 1})")
        results[precision] = (loss.item(), grads, attempt)
    base_loss, base_grad, _ = results["fp32"]
    details = []
    for precision in ("bf16", "fp16"):
        loss, grad, attempts = results[precision]
        rel, cos = abs(loss - base_loss) / abs(base_loss), _cosine(grad, base_grad)
        require(rel < 0.05, f"{precision}: loss {loss:.4f} vs fp32 {base_loss:.4f}")
        require(cos > 0.9, f"{precision}: gradient cosine to fp32 {cos:.4f} <= 0.9")
        details.append(f"{precision} loss {loss:.4f} (fp32 {base_loss:.4f}), gradient cosine {cos:.4f}"
                       + (f", finite after {attempts - 1} scale halvings" if precision == "fp16" else ""))
    return f"{sizes.big_preset}: " + "; ".join(details)


# ---- checks: training through the engine ---------------------------------------------------------------

def _train_rows(out_dir: Path) -> list[dict[str, Any]]:
    with open(out_dir / "metrics.jsonl") as f:
        return [row for row in map(json.loads, f) if row.get("type") == "train"]


def _loss_falls(out_dir: Path, label: str) -> tuple[float, float]:
    rows = _train_rows(out_dir)
    require(len(rows) >= 4, f"{label}: only {len(rows)} logged rows")
    first = sum(r["loss"] for r in rows[:2]) / 2
    last = sum(r["loss"] for r in rows[-2:]) / 2
    require(math.isfinite(last) and last < 0.85 * first, f"{label}: loss {first:.3f} -> {last:.3f} (not < 0.85x)")
    return first, last


def check_training(device: torch.device, sizes: Sizes, data: dict[str, tuple[Path, Path]], work: Path,
                   report: Report) -> str:
    import isda.engine

    (train_ann, train_images), (val_ann, val_images) = data["train"], data["val"]
    amp = "bf16" if device.type == "cuda" else "none"
    runs = {
        "isda_tiny": (get_preset("isda_tiny"), {"train.log_every": max(1, sizes.tiny_steps // 10),
                                                "train.batch_size": sizes.tiny_batch}, sizes.tiny_steps),
    }
    if sizes.big_preset == "isda_r50_coco":
        runs.update({
        # The paper's architecture (6+6 layers, 300 queries, dropout, fixed points) from scratch: BatchNorm,
        # nothing frozen, a reduced input size.
        "isda_r50_coco (reduced)": (get_preset("isda_r50_coco"), {
            "model.from_scratch": True, "model.backbone_norm": "bn", "model.frozen_stages": 0,
            "train.lr_backbone_mult": 1.0,
            "train.lr": 2e-4, "train.batch_size": 4, "train.amp": amp,
            "train.log_every": max(1, sizes.r50_steps // 10), "data.train_short_sides": (sizes.r50_side,),
            "data.train_max_size": sizes.r50_side, "data.crop_prob": 0.0, "data.test_short_side": sizes.r50_side,
            "data.test_max_size": sizes.r50_side}, sizes.r50_steps),
        })
    details, rows = [], []
    for name, (cfg, overrides, steps) in runs.items():
        apply_overrides(cfg, {"train.num_workers": 2, **overrides})
        out = work / name.split()[0]
        summary = isda.engine.train(cfg, train_ann, train_images, val_ann, val_images, out_dir=out,
                                    max_iters=steps, device=str(device), log=lambda _msg: None)
        first, last = _loss_falls(out, name)
        images_per_s = steps * cfg.train.batch_size / summary["train_time_s"]
        ap = (summary["val"] or {}).get("AP")
        rows.append({"run": name, "steps": steps, "batch": cfg.train.batch_size, "amp": cfg.train.amp,
                     "loss first": round(first, 3), "loss last": round(last, 3),
                     "images/s": round(images_per_s, 1), "val mask AP": ap})
        details.append(f"{name}: loss {first:.2f} -> {last:.2f}")
    report.tables["training runs"] = rows
    return "; ".join(details)


def check_onnx(device: torch.device, sizes: Sizes, work: Path, report: Report) -> str:
    """The tiny model trained above, exported, run by ONNX Runtime on the device's provider: the same detections
    as PyTorch on the device, and both latencies."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
        return "skipped: onnx / onnxruntime not installed (pip install 'isda[export]')"
    import onnxruntime as ort

    from isda.deploy.onnx_export import export_onnx
    from isda.deploy.runtime import OnnxISDA
    from isda.inference import load_trained_model

    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        return f"skipped: this ONNX Runtime has no {provider} ({', '.join(ort.get_available_providers())})"
    checkpoint = work / "isda_tiny" / "last.pt"
    require(checkpoint.is_file(), "no trained tiny checkpoint (the training check did not run)")
    info = export_onnx(checkpoint, work / "isda_tiny.onnx")
    exported = OnnxISDA(info.path, providers=(provider,))
    loaded = load_trained_model(checkpoint, device)
    image = shapes_batch((128, 171), batch=1, seed=7, num_classes=5)[0][0]  # a size the trace did not see
    with torch.no_grad():
        expected = loaded.model([image.to(device)])[0]
    got = exported([image])[0]
    top = 10
    err = float((got["scores"][:top] - expected["scores"][:top].cpu()).abs().max())
    require(err < 1e-3, f"top-{top} scores differ by {err:.1e} from PyTorch's")
    # Same detections: each of ONNX's best 5 (query, class) pairs is among PyTorch's best 10, unless its score
    # ties (within 1e-3) with PyTorch's 10th (a briefly trained model has many near-equal scores).
    pairs = set(zip(expected["query_index"][:top].tolist(), expected["labels"][:top].tolist()))
    boundary = float(expected["scores"][top - 1]) + 1e-3
    missing = [p for p, score in zip(zip(got["query_index"][:5].tolist(), got["labels"][:5].tolist()),
                                     got["scores"][:5].tolist()) if p not in pairs and score > boundary]
    require(not missing, f"(query, label) pairs {missing} of ONNX's top 5 are not in PyTorch's top {top}")

    def run_torch() -> None:
        with torch.no_grad():
            loaded.model([image.to(device)])

    rows = [{"runtime": "PyTorch eager", "device": str(device),
             "ms/image": round(_time(run_torch, device, 2 * sizes.repeats) * 1e3, 2)},
            {"runtime": f"ONNX Runtime {ort.__version__}", "device": provider,
             "ms/image": round(_time(lambda: exported([image]), torch.device("cpu"), 2 * sizes.repeats) * 1e3, 2)}]
    report.tables["ONNX Runtime (tiny preset, 128x171)"] = rows
    return f"{provider}: top-{top} scores within {err:.1e} of PyTorch, same detections; export {info.seconds:.1f} s"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_torchrun(device: torch.device, sizes: Sizes, data: dict[str, tuple[Path, Path]], work: Path) -> str:
    """``torchrun --nproc_per_node=1 -m isda train`` for N steps, then ``--resume`` to 2N."""
    out = work / "torchrun"
    train_ann, train_images = data["train"]
    n = sizes.ddp_steps
    logs = []
    for steps, extra in ((n, []), (2 * n, ["--resume"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={_free_port()}",
               "-m", "isda", "train", "--preset", "isda_tiny", "--ann", str(train_ann), "--images", str(train_images),
               "--out", str(out), "--max-iters", str(steps), "--device", device.type,
               "--set", f"train.checkpoint_every={max(1, n // 2)}", "--set", f"train.log_every={max(1, n // 4)}",
               "--set", "train.num_workers=1", "--set", f"train.batch_size={sizes.tiny_batch}", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        logs.append(proc.stdout + proc.stderr)
        require(proc.returncode == 0, f"torchrun exit {proc.returncode}: {_last_line(proc.stderr or proc.stdout)}")
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    require(checkpoint["iteration"] == 2 * n, f"resumed run ended at step {checkpoint['iteration']}, not {2 * n}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    require(f"backend {backend}" in logs[0], f"the run did not report a {backend} process group")
    iters = [r["iter"] for r in _train_rows(out)]
    require(iters == sorted(set(iters)), f"metrics rows repeat or go back after the resume: {iters}")
    return f"{backend}: {n} steps, checkpoint, resume to {2 * n}"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---- measurements ----------------------------------------------------------------------------------------

def _maskrcnn(frozen: bool, size: tuple[int, int]) -> torch.nn.Module:
    """Mask R-CNN that keeps ``size`` as it is (no resize to 800) and sends 100 detections to its mask head."""
    return limit_candidates(build_maskrcnn(frozen=frozen, min_size=min(size), max_size=max(size),
                                           box_detections_per_img=100))


def _targets_for(name: str, targets: list[dict[str, torch.Tensor]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    if name.startswith("ISDA"):
        return [{"labels": t["labels"].to(device), "masks": t["masks"].to(device)} for t in targets]
    # Mask R-CNN: class 0 is the background, masks as uint8, boxes.
    return [{"labels": t["labels"].to(device) + 1, "masks": t["masks"].to(device, torch.uint8),
             "boxes": t["boxes"].to(device)} for t in targets]


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

                _reset_peak(device)
                try:
                    seconds = _time(forward, device, sizes.repeats)
                except Exception as e:  # a baseline that cannot run a mode is a note, not a failed check of ours
                    if name.startswith("ISDA"):
                        raise
                    rows.append({"model": name, "batch": batch, "precision": precision,
                                 "channels-last": channels_last, "error": _last_line(str(e))})
                    continue
                rows.append({"model": name, "batch": batch, "precision": precision, "channels-last": channels_last,
                             "ms/batch": round(seconds * 1e3, 1), "images/s": round(batch / seconds, 1),
                             "peak GiB": _round(_peak_gib(device))})
        del model
        _empty_cache(device)
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
            targets = _targets_for(name, targets, device)
            for precision in sizes.precisions:

                def step() -> None:
                    optimizer.zero_grad(set_to_none=True)
                    with autocast(device, AMP[precision]):
                        losses = model(images, targets)
                    loss = losses["loss"] if "loss" in losses else sum(losses.values())
                    loss.backward()
                    optimizer.step()

                _reset_peak(device)
                seconds = _time(step, device, sizes.repeats)
                rows.append({"model": name, "batch": batch, "precision": precision,
                             "ms/step": round(seconds * 1e3, 1), "images/s": round(batch / seconds, 1),
                             "peak GiB": _round(_peak_gib(device))})
        del model, optimizer
        _empty_cache(device)
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

        rows.append({"implementation": name, "queries": S, "forward ms": round(_time(forward, device, sizes.repeats) * 1e3, 2),
                     "forward+backward ms": round(_time(forward_backward, device, sizes.repeats) * 1e3, 2)})
    return rows


def measure_profile(device: torch.device, sizes: Sizes) -> list[dict[str, Any]]:
    """Kernel time by operator for one bf16 R50 forward at the inference size and one training step, and the
    share of the deformable attention core (its grid_sample kernels)."""
    from torch.profiler import ProfilerActivity, profile

    model = build_isda(sizes.big_preset).to(device)
    images, targets = shapes_batch(sizes.train_size, batch=2, seed=0, num_classes=5)
    images = [im.to(device) for im in images]
    targets = _targets_for("ISDA", targets, device)
    infer_images = [torch.rand(3, *sizes.infer_size, device=device)]
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU

    def infer() -> None:
        model.eval()
        with torch.no_grad(), autocast(device, "bf16"):
            model(infer_images)

    def train_step() -> None:
        model.train()
        with autocast(device, "bf16"):
            loss = model(images, targets)["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)

    rows = []
    for label, fn in (("inference, batch 1", infer), ("training step, batch 2", train_step)):
        fn()
        _sync(device)
        with profile(activities=[activity]) as prof:
            fn()
            _sync(device)
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


# ---- the page --------------------------------------------------------------------------------------------

def environment(device: torch.device) -> dict[str, str]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "host CPU cores": str(os.cpu_count())}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"device": props.name, "multiprocessors": str(props.multi_processor_count),
                    "memory": f"{props.total_memory / 2**30:.0f} GiB", "CUDA": str(torch.version.cuda),
                    "cuDNN": str(torch.backends.cudnn.version())})
    else:
        env["device"] = "CPU"
    return env


def _markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def render(report: Report, command: str, seconds: float) -> str:
    status = "all checks passed" if report.ok else "SOME CHECKS FAILED"
    lines = ["# GPU check", "",
             f"Generated by `{command}` (`benchmarks/gpu_check.py`) in {seconds / 60:.1f} minutes: **{status}**.", ""]
    lines += [f"- {k}: {v}" for k, v in environment(report.device).items()]
    lines += ["", "## Checks", "", *_markdown_table(
        [{"check": c["name"], "result": "ok" if c["ok"] else "**FAILED**", "seconds": c["seconds"],
          "detail": c["detail"]} for c in report.checks])]
    for title, rows in report.tables.items():
        lines += ["", f"## {title[0].upper()}{title[1:]}", "", *_markdown_table(rows)]
    if report.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in report.notes]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CPU smoke test)")
    parser.add_argument("--page", default=str(ROOT / "docs" / "gpu.md"), help="where to write the page")
    parser.add_argument("--skip", default="", help="comma-separated check names to leave out (prefixes)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: CUDA is not available on this machine (run with --device cpu --quick for the smoke test)",
              file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    skip = [s for s in args.skip.split(",") if s]
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the comparisons
    report = Report(device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="isda-gpu-check-") as tmp:
        work = Path(tmp)
        data = make_shapes_dataset(work / "shapes", num_train=sizes.shapes_train, num_val=max(8, sizes.shapes_train // 8))
        checks: dict[str, Callable[[], Any]] = {
            "ms_deform_attn vs float64 reference": lambda: check_msda_reference(device),
            "ms_deform_attn under bf16/fp16 autocast": lambda: check_msda_half(device),
            "ms_deform_attn, R50 encoder at 1333x1333": lambda: check_msda_large(device, sizes),
            "training step: fp32 / bf16 / fp16 + scaler": lambda: check_amp_step(device, sizes),
            "training runs on shapes (loss falls)": lambda: check_training(device, sizes, data, work, report),
            "torchrun: train, checkpoint, resume": lambda: check_torchrun(device, sizes, data, work),
            "ONNX Runtime on the device": lambda: check_onnx(device, sizes, work, report),
        }
        measurements: dict[str, Callable[[], list[dict[str, Any]]]] = {
            "inference throughput": lambda: measure_inference(device, sizes),
            "training throughput": lambda: measure_training(device, sizes),
            "deformable attention core": lambda: measure_msda(device, sizes),
            "kernel profile (bf16)": lambda: measure_profile(device, sizes),
        }
        for name, fn in checks.items():
            if not any(name.startswith(s) for s in skip):
                report.check(name, fn)
        for name, fn in measurements.items():
            if not any(name.startswith(s) for s in skip):
                report.measure(name, fn)
    command = "python -m benchmarks.gpu_check" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    page = render(report, command, time.perf_counter() - start)
    atomic_write_text(args.page, page)
    print(page)
    print(f"gpu-check: {'ok' if report.ok else 'FAILED'}; page written to {args.page}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
