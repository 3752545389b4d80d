"""The pass/fail checks: the deformable attention core against its float64 reference and under autocast, one
training step in each precision, short training runs through the engine, torchrun with a resume, and the
exported model under ONNX Runtime."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from isda.config import apply_overrides, get_preset
from isda.engine.amp import autocast
from isda.models.deformable_attention import MSDeformAttn
from isda.ops import ms_deform_attn

from ..common import build_isda, msda_problem, reference_ms_deform_attn, shapes_batch
from .harness import (AMP, Report, Sizes, cosine, last_line, max_rel, median_time, peak_gib, require, reset_peak,
                      sync, targets_for)


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
        errors = {"output": max_rel(out, ref)}
        errors.update({name: max_rel(inputs[i].grad, g)
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
        err = max_rel(out, expected)
        require(err < tol, f"{precision}: relative error {err:.2e} >= {tol}")
        details.append(f"{precision} {err:.1e}")
    return "relative error vs fp32: " + ", ".join(details)


def check_msda_large(device: torch.device, sizes: Sizes) -> str:
    """The encoder's whole value table of an R50 at 1333x1333, batch 2, forward + backward."""
    S = sum(h * w for h, w in sizes.encoder_shapes)
    inputs = [t.to(device) for t in msda_problem(S, shapes=sizes.encoder_shapes, batch=2, seed=3)]
    reset_peak(device)
    start = time.perf_counter()
    outs = {}
    for impl in ("grid_sample", "gather"):
        leaves = [t.requires_grad_(True) if t.is_floating_point() else t for t in (x.detach() for x in inputs)]
        out = ms_deform_attn(*leaves, impl=impl)
        out.square().mean().backward()
        require(bool(torch.isfinite(out).all()) and bool(torch.isfinite(leaves[0].grad).all()),
                f"{impl}: non-finite output or gradient")
        outs[impl] = (out.detach(), leaves[0].grad)
    sync(device)
    err = max_rel(outs["grid_sample"][0], outs["gather"][0])
    err_grad = max_rel(outs["grid_sample"][1], outs["gather"][1])
    require(err < 1e-5 and err_grad < 1e-4, f"implementations disagree: output {err:.1e}, d value {err_grad:.1e}")
    peak = peak_gib(device)
    return (f"{S} tokens x {S} queries, both implementations agree (output {err:.1e}, d value {err_grad:.1e}), "
            f"{time.perf_counter() - start:.1f} s" + (f", peak {peak:.1f} GiB" if peak is not None else ""))


# ---- checks: mixed precision training step ------------------------------------------------------------

def check_amp_step(device: torch.device, sizes: Sizes) -> str:
    """One isda_r50_coco step (dropout off so that the three runs see the same network) in fp32, bf16 and fp16
    with a grad scaler, from the same weights and batch: finite, and gradients point the same way as fp32's."""
    model = build_isda(sizes.big_preset, seed=0, dropout=0.0).to(device).train()
    images, targets = shapes_batch(sizes.step_size, batch=2, seed=0, num_classes=5)
    images = [im.to(device) for im in images]
    targets = targets_for("ISDA", targets, device)
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
        rel, cos = abs(loss - base_loss) / abs(base_loss), cosine(grad, base_grad)
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
        # The lr warm-up is a fraction of the planned run (the preset plans a long one), so plan the steps made.
        "isda_tiny": (get_preset("isda_tiny"), {"train.log_every": max(1, sizes.tiny_steps // 10),
                                                "train.max_steps": sizes.tiny_steps,
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
                     "images/s": round(images_per_s, 1),
                     "val mask AP": None if ap is None else round(100 * ap, 1)})
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
             "ms/image": round(median_time(run_torch, device, 2 * sizes.repeats) * 1e3, 2)},
            {"runtime": f"ONNX Runtime {ort.__version__}", "device": provider,
             "ms/image": round(median_time(lambda: exported([image]), torch.device("cpu"), 2 * sizes.repeats) * 1e3, 2)}]
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
        require(proc.returncode == 0, f"torchrun exit {proc.returncode}: {last_line(proc.stderr or proc.stdout)}")
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    require(checkpoint["iteration"] == 2 * n, f"resumed run ended at step {checkpoint['iteration']}, not {2 * n}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    require(f"backend {backend}" in logs[0], f"the run did not report a {backend} process group")
    iters = [r["iter"] for r in _train_rows(out)]
    require(iters == sorted(set(iters)), f"metrics rows repeat or go back after the resume: {iters}")
    return f"{backend}: {n} steps, checkpoint, resume to {2 * n}"
