"""Where an exported graph spends its time in ONNX Runtime: per op type and per node, as shares of the total.

    python -m benchmarks.profile_onnx --preset isda_r50_coco --size 800x1216    # exports (random init), profiles
    python -m benchmarks.profile_onnx --onnx model.onnx --size 800x1216 --runs 2
    python -m benchmarks.profile_onnx --preset isda_r50_coco --json docs/onnx_profile.json   # for docs/export.md

ONNX Runtime's own profiler (``SessionOptions.enable_profiling``) records every node's kernel time; the first
run (allocations, one-off work) is left out. Shares only: no latency is printed (take those on a quiet machine
with ``benchmarks.bench_onnx``). ``--json`` also writes the shares (percent per op type, per top-level part and
per module) with the run's provenance, for pages to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from isda.fileio import atomic_write_text

from .common import machine_info
from .provenance import meta
from .quiet import measured
from .worker import parse_size


def profile(onnx: str | os.PathLike, size: tuple[int, int], runs: int = 2, threads: int = 2,
            optimization: str = "all") -> tuple[dict[str, float], dict[str, float]]:
    """Kernel microseconds per op type and per node name over ``runs`` runs after one warm-up."""
    import onnxruntime as ort

    from isda.deploy.runtime import session_options

    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads, optimization)  # what `isda predict` runs
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        ort_session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feed = {"image": rng.random((1, 3, *size), dtype=np.float32), "output_size": np.asarray(size, np.int64)}
        for _ in range(runs + 1):
            ort_session.run(None, feed)
        events = json.loads(Path(ort_session.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    by_node: dict[str, float] = defaultdict(float)
    # Events are written as they end (a run's after its nodes): the warm-up is the earliest model_run span.
    warmup = min((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                 key=lambda e: e["ts"])
    for e in events:
        if (e.get("cat") != "Node" or not e["name"].endswith("_kernel_time")
                or e["ts"] <= warmup["ts"] + warmup["dur"]):
            continue
        by_op[e["args"]["op_name"]] += e["dur"]
        by_node[e["name"][: -len("_kernel_time")]] += e["dur"]
    return dict(by_op), dict(by_node)


def by_scope(by_node: dict[str, float], depth: int = 3) -> dict[str, float]:
    """Node times summed per module scope, layer indices merged: ``/transformer/encoder.3/self_attn/Gather_5``
    -> ``/transformer/encoder/self_attn`` (every encoder layer's deformable attention together)."""
    scopes: dict[str, float] = defaultdict(float)
    for name, t in by_node.items():
        parts = re.sub(r"\.\d+", "", name).split("/")[1:-1]  # leading "", trailing node name
        scopes["/" + "/".join(parts[:depth]) if parts else "(top level)"] += t
    return dict(scopes)


def shares(times: dict[str, float]) -> dict[str, float]:
    """Percent of the total per key, largest first, keys without a leading slash (a figure path's parts)."""
    total = sum(times.values()) or 1.0
    return {name.lstrip("/"): round(100 * t / total, 2) for name, t in sorted(times.items(), key=lambda kv: -kv[1])}


def table(times: dict[str, float], top: int) -> list[str]:
    return [f"{share:6.1f}%  {name}" for name, share in list(shares(times).items())[:top]]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", type=Path, help="an exported file (default: export --preset with random weights)")
    p.add_argument("--preset", default="isda_tiny")
    p.add_argument("--size", type=parse_size, default=(800, 1216), help="HxW of the profiled image")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--optimization", choices=("none", "basic", "all"), default="all",
                   help="ONNX Runtime graph optimisation level")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", type=Path, help="also write the shares (percent) and the run's provenance here")
    p.add_argument("--no-settle", action="store_true", help="start without waiting for a quiet machine (tests)")
    args = p.parse_args(argv)
    onnx = args.onnx
    if onnx is None:
        from isda.config import get_preset
        from isda.deploy.onnx_export import export_model, isda_metadata

        from .common import build_isda

        onnx = Path(tempfile.mkdtemp()) / f"{args.preset}.onnx"
        export_model(build_isda(args.preset, seed=0).eval(), onnx, isda_metadata(get_preset(args.preset)))
    with measured(settle_first=not args.no_settle) as timing:
        by_op, by_node = profile(onnx, args.size, args.runs, args.threads, args.optimization)
    print(f"{onnx} at {args.size[0]}x{args.size[1]}, {args.threads} threads, {args.runs} runs")
    print("per op type:", *table(by_op, args.top), sep="\n")
    by_module = by_scope(by_node)
    print("per module (layer indices merged):", *table(by_module, args.top), sep="\n")
    print("per node:", *table(by_node, args.top), sep="\n")
    if args.json:
        record = {"onnx": "exported from the preset, random weights" if args.onnx is None else args.onnx.name,
                  "size": f"{args.size[0]}x{args.size[1]}", "threads": args.threads, "runs": args.runs,
                  "optimization": args.optimization, "machine": machine_info(args.threads),
                  "by_op": shares(by_op), "by_part": shares(by_scope(by_node, depth=1)),
                  "by_module": shares(by_module)}
        command = "python -m benchmarks.profile_onnx " + " ".join(argv if argv is not None else sys.argv[1:])
        record["_meta"] = meta(command, [f"preset:{args.preset}:model,data"] if args.onnx is None else [], timing)
        atomic_write_text(args.json, json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
