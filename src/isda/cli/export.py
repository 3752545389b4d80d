"""``isda export``: a checkpoint as one ONNX graph, post-processing included."""

from __future__ import annotations

import argparse

from .common import UserError


def cmd_export(args: argparse.Namespace) -> None:
    from ..deploy.onnx_export import INPUTS, OUTPUTS, export_onnx
    from ..deploy.quantize import calibration_images, quantize_int8

    if args.opset < 17:
        raise UserError(f"--opset must be >= 17 (GridSample, LayerNormalization), got {args.opset}")
    if args.int8 != bool(args.calib_images):
        raise UserError("--int8 needs --calib-images DIR (and --calib-images needs --int8)")
    images = calibration_images(args.calib_images, args.calib_count) if args.int8 else []
    info = export_onnx(args.weights, args.out, opset=args.opset)
    print(f"wrote {info.path} ({info.size_bytes / 2**20:.1f} MiB, opset {info.opset}, {info.seconds:.1f} s)")
    if args.int8:
        out = info.path.with_name(f"{info.path.stem}_int8.onnx")
        counts = quantize_int8(info.path, out, images)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; int8 nodes: "
              + ", ".join(f"{n} {kind}" for kind, n in counts.items()) + f"; calibrated on {len(images)} images)")
    print("inputs:  " + ", ".join(INPUTS) + "; outputs: " + ", ".join(OUTPUTS) + " (meanings in the model's metadata)")
    print(f"check its AP: isda eval --weights {info.path} --ann VAL.json --images VAL/")
