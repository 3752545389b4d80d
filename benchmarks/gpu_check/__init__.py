"""GPU readiness: one command that checks and measures the CUDA path (``make gpu-check``).

    python -m benchmarks.gpu_check                       # on a CUDA machine: writes docs/gpu_check.md
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
run, the deformable-attention core's two implementations (alone and inside the model), and a kernel profile of the
bf16 forward and training step (what share the core takes).

The checks are in ``checks.py``, the measurements in ``measurements.py``, the page in ``page.py``; what they
share (sizes, the report, timing) in ``harness.py``; ``main`` below runs them in order.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from isda.data.shapes import make_shapes_dataset
from isda.fileio import atomic_write_text

from .checks import (check_amp_step, check_msda_half, check_msda_large, check_msda_reference, check_onnx,
                     check_torchrun, check_training)
from .harness import FULL, QUICK, Report, require
from .measurements import measure_core_in_model, measure_inference, measure_msda, measure_profile, measure_training
from .page import render

__all__ = ["Report", "main", "render", "require"]

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CPU smoke test)")
    parser.add_argument("--page", default=str(ROOT / "docs" / "gpu_check.md"), help="where to write the page")
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
            "core implementation in the model": lambda: measure_core_in_model(device, sizes),
            "kernel profile (bf16)": lambda: measure_profile(device, sizes),
        }
        # The command as a reader reruns it: --page is where the page went, not part of what was measured.
        shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--page" and a != args.page
                 and not a.startswith("--page=")]
        command = " ".join(["python -m benchmarks.gpu_check", *shown])

        def save() -> str:
            page = render(report, command, time.perf_counter() - start)
            atomic_write_text(args.page, page)
            return page

        # The page is rewritten after every row, so a run cut short by a time limit still leaves what it found.
        for name, fn in checks.items():
            if not any(name.startswith(s) for s in skip):
                report.check(name, fn)
                save()
        for name, fn in measurements.items():
            if not any(name.startswith(s) for s in skip):
                report.measure(name, fn)
                save()
    page = save()
    print(page)
    print(f"gpu-check: {'ok' if report.ok else 'FAILED'}; page written to {args.page}")
    return 0 if report.ok else 1
