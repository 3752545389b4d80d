"""``isda export``: a checkpoint as one ONNX graph, post-processing included."""

from __future__ import annotations

import argparse

from .common import UserError


def cmd_export(args: argparse.Namespace) -> None:
    from ..deploy.onnx_export import INPUTS, OUTPUTS, export_onnx

    if args.opset < 17:
        raise UserError(f"--opset must be >= 17 (GridSample, LayerNormalization), got {args.opset}")
    info = export_onnx(args.weights, args.out, opset=args.opset)
    print(f"wrote {info.path} ({info.size_bytes / 2**20:.1f} MiB, opset {info.opset}, {info.seconds:.1f} s)")
    print("inputs:  " + ", ".join(INPUTS) + "; outputs: " + ", ".join(OUTPUTS) + " (meanings in the model's metadata)")
    print(f"check its AP: isda eval --weights {info.path} --ann VAL.json --images VAL/")
