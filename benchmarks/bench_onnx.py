"""ONNX export benchmark: ONNX Runtime (CPU) vs PyTorch eager, and ONNX Runtime's dynamic int8 quantisation.

    python -m benchmarks.bench_onnx                               # both presets; trains a tiny model for the AP rows
    python -m benchmarks.bench_onnx --weights runs/demo/best.pt   # the AP rows from an existing shapes model
    python -m benchmarks.bench_onnx --presets isda_tiny@128x128 --repeats 3 --train-seconds 120

Per preset and size: the export (wall time, peak RSS of the exporting process, file size), then the latency of
one image through PyTorch eager, ONNX Runtime float32 and ONNX Runtime with the transformer's linear layers
quantised to int8, each in its own fresh process (peak RSS its own), runs alternated and medians reported
(:func:`benchmarks.procs.compare`). ``isda_r50_coco`` has its random initialisation (seed 0); the tiny preset
the trained model when there is one. Then COCO mask AP of the trained tiny model on the shapes validation
split through the three paths. Writes ``docs/onnx.{md,json}`` (``--page``).

Timings are only meaningful on a quiet machine: the load average is recorded before and after each part.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from isda.fileio import atomic_write_text

from .common import INFER_SIZE, build_isda, machine_info, peak_rss_gib, set_threads
from .procs import ROOT, compare
from .provenance import meta
from .worker import parse_size

DEFAULT_PRESETS = f"isda_r50_coco@{INFER_SIZE[0]}x{INFER_SIZE[1]},isda_tiny@128x128"
GOAL = 0.7  # ONNX Runtime latency / PyTorch eager latency


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---- export (a fresh process: its peak RSS is the export's) ---------------------------------------------

def export_worker(preset: str, size: tuple[int, int], out: Path, weights: str | None, threads: int) -> dict[str, Any]:
    from isda.config import get_preset
    from isda.deploy.onnx_export import export_model, isda_metadata, quantize_transformer
    from isda.inference import load_trained_model

    set_threads(threads)
    if weights:
        loaded = load_trained_model(weights)
        model, metadata = loaded.model, isda_metadata(loaded.cfg, loaded.class_names, loaded.cat_ids)
    else:
        model, metadata = build_isda(preset, seed=0).eval(), isda_metadata(get_preset(preset))
    info = export_model(model, out, metadata, size=size)
    rss = peak_rss_gib()
    start = time.perf_counter()
    nodes = quantize_transformer(out, out.with_name(out.stem + "_int8.onnx"))
    return {"export_s": info.seconds, "export_peak_rss_gib": rss, "bytes": info.size_bytes,
            "int8_s": time.perf_counter() - start, "int8_bytes": out.with_name(out.stem + "_int8.onnx").stat().st_size,
            "int8_nodes": len(nodes)}


def run_export(preset: str, size: tuple[int, int], out: Path, weights: str | None, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_onnx", "--export-worker", preset, "--size", f"{size[0]}x{size[1]}",
           "--out", str(out), "--threads", str(threads)] + (["--weights", weights] if weights else [])
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"export failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- latency --------------------------------------------------------------------------------------------

def latency(preset: str, size: tuple[int, int], onnx: Path, weights: str | None, threads: int, repeats: int,
            log=print) -> dict[str, Any]:
    common = ["--task", "infer", "--size", f"{size[0]}x{size[1]}", "--threads", str(threads), "--preset", preset]
    specs = {"eager": common + ["--model", "isda"] + (["--weights", weights] if weights else []),
             "onnxruntime": common + ["--model", "isda_onnx", "--onnx", str(onnx)],
             "onnxruntime_int8": common + ["--model", "isda_onnx", "--onnx", str(onnx.with_name(onnx.stem + "_int8.onnx"))]}
    out = compare(specs, repeats=repeats, warmup=1, log=log)
    eager = out["eager"]["time"]["median"]
    for name in ("onnxruntime", "onnxruntime_int8"):
        out[name]["ratio_to_eager"] = out[name]["time"]["median"] / eager
    return out


# ---- accuracy (the trained tiny model on the shapes validation split) -----------------------------------

def train_tiny(data: Path, out: Path, seconds: float) -> str:
    """A tiny-preset shapes model for the AP rows (``isda train`` with a time budget)."""
    if not (data / "annotations" / "instances_val.json").is_file():
        subprocess.run([sys.executable, "-m", "isda", "shapes", str(data)], cwd=ROOT, env=_env(), check=True)
    if not (out / "best.pt").is_file():
        # One thread and no loader processes: on a shared machine oversubscribed OpenMP threads spin-wait.
        env = {**_env(), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "isda", "train", "--preset", "isda_tiny", "--data", str(data), "--out",
                        str(out), "--set", f"train.time_budget_s={seconds}", "--set", "train.num_workers=0", "--resume"],
                       cwd=ROOT, env=env, check=True)
    return str(out / "best.pt")


def accuracy(weights: str, onnx: Path, data: Path, threads: int) -> dict[str, Any]:
    from isda.data import CocoInstanceDataset, build_transforms
    from isda.engine import evaluate
    from isda.inference import load_trained_model

    set_threads(threads)
    rows = {}
    for name, path in (("eager", weights), ("onnxruntime", str(onnx)),
                       ("onnxruntime_int8", str(onnx.with_name(onnx.stem + "_int8.onnx")))):
        loaded = load_trained_model(path)
        dataset = CocoInstanceDataset(data / "annotations" / "instances_val.json", data / "val",
                                      build_transforms(loaded.cfg.data, train=False), train=False)
        start = time.perf_counter()
        result, _ = evaluate(loaded.model, dataset, "cpu")
        rows[name] = {"stats": result.stats, "seconds": time.perf_counter() - start, "images": len(dataset)}
    return rows


# ---- page -----------------------------------------------------------------------------------------------

def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = ["# ONNX export: ONNX Runtime vs PyTorch eager (CPU)", "",
             f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, onnxruntime {results['onnxruntime']}; "
             f"measured {results['_meta']['date']}. Command: `{results['_meta']['command']}`.", "",
             "Each side runs in its own fresh process (peak RSS = `ru_maxrss` of that process, model included), one "
             "image, runs alternated eager / ONNX Runtime / int8, medians. int8 = ONNX Runtime's dynamic quantisation "
             "(`isda.deploy.onnx_export.quantize_transformer`) of the transformer's linear layers only.", ""]
    for key, sec in results["presets"].items():
        lat, exp = sec["latency"], sec["export"]
        lines += [f"## {key}" + (" (trained on shapes)" if sec.get("weights") else " (random initialisation)"), "",
                  "| path | median | min | max | runs | ratio to eager | peak RSS |", "|---|---|---|---|---|---|---|"]
        for name in ("eager", "onnxruntime", "onnxruntime_int8"):
            t = lat[name]["time"]
            ratio = lat[name].get("ratio_to_eager", 1.0)
            lines.append(f"| {name} | {t['median']:.3f} s | {t['min']:.3f} s | {t['max']:.3f} s | {t['n']} | "
                         f"**{ratio:.2f}** | {lat[name]['peak_rss_gib']:.2f} GiB |")
        lines += ["", f"Export: {exp['export_s']:.1f} s, peak RSS {exp['export_peak_rss_gib']:.2f} GiB, "
                      f"{exp['bytes'] / 2**20:.1f} MiB; int8 quantisation {exp['int8_s']:.1f} s "
                      f"({exp['int8_nodes']} MatMul/Gemm nodes), {exp['int8_bytes'] / 2**20:.1f} MiB. "
                      f"Goal ONNX Runtime <= {GOAL} x eager: "
                      f"**{'met' if lat['onnxruntime']['ratio_to_eager'] <= GOAL else 'not met'}** "
                      f"({lat['onnxruntime']['ratio_to_eager']:.2f}).",
                  f"<sub>load average {sec['load_before']} before, {sec['load_after']} after.</sub>", ""]
    if results.get("accuracy"):
        acc = results["accuracy"]
        lines += ["## Mask AP on the shapes validation split (isda_tiny)", "",
                  f"Model: `{acc['weights']}`. AP on the 0-100 scale.", "",
                  "| path | AP | AP50 | AP75 | eval time |", "|---|---|---|---|---|"]
        for name, row in acc["rows"].items():
            s = row["stats"]
            lines.append(f"| {name} | {100 * s['AP']:.2f} | {100 * s['AP50']:.2f} | {100 * s['AP75']:.2f} | "
                         f"{row['seconds']:.1f} s ({row['images']} images) |")
        lines += ["", f"<sub>load average {acc['load_before']} before, {acc['load_after']} after.</sub>", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=DEFAULT_PRESETS, help="comma-separated PRESET@HxW")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--weights", help="a trained isda_tiny shapes checkpoint (default: train one)")
    p.add_argument("--train-seconds", type=float, default=480.0, help="training budget when --weights is not given")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "shapes")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_onnx", help="exports and the trained model")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--page", type=Path, default=ROOT / "docs" / "onnx.md")
    p.add_argument("--export-worker", metavar="PRESET", help=argparse.SUPPRESS)
    p.add_argument("--size", type=parse_size, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.export_worker:
        print(json.dumps(export_worker(args.export_worker, args.size, args.out, args.weights, args.threads)))
        return None

    import onnxruntime

    args.work.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.bench_onnx " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    results: dict[str, Any] = {"machine": machine_info(args.threads), "onnxruntime": onnxruntime.__version__,
                               "presets": {}}
    load_before = _load()[0]
    presets = [item.partition("@")[0] for item in args.presets.split(",")]
    weights = args.weights
    if weights is None and not args.no_accuracy:
        print(f"training a tiny shapes model ({args.train_seconds:.0f} s) for the AP rows", flush=True)
        weights = train_tiny(args.data, args.work / "tiny", args.train_seconds)
    for item in args.presets.split(","):
        preset, _, size_text = item.partition("@")
        size = parse_size(size_text) if size_text else INFER_SIZE
        key = f"{preset} {size[0]}x{size[1]}"
        own = weights if preset == "isda_tiny" else None
        print(f"{key}: export", flush=True)
        before = _load()
        onnx = args.work / f"{preset}_{size[0]}x{size[1]}.onnx"
        export = run_export(preset, size, onnx, own, args.threads)
        print(f"  {export['export_s']:.1f} s, {export['bytes'] / 2**20:.1f} MiB; latency", flush=True)
        lat = latency(preset, size, onnx, own, args.threads, args.repeats, log=lambda s: print(s, flush=True))
        results["presets"][key] = {"export": export, "latency": lat, "weights": own, "load_before": before,
                                   "load_after": _load()}
        print(f"  ratio onnxruntime / eager {lat['onnxruntime']['ratio_to_eager']:.2f}, int8 "
              f"{lat['onnxruntime_int8']['ratio_to_eager']:.2f}", flush=True)
    if weights is not None and not args.no_accuracy:
        before = _load()
        onnx = args.work / "isda_tiny_accuracy.onnx"
        run_export("isda_tiny", (133, 181), onnx, weights, args.threads)
        rows = accuracy(weights, onnx, args.data, args.threads)
        results["accuracy"] = {"weights": weights, "rows": rows, "load_before": before, "load_after": _load()}
        print(json.dumps({k: v["stats"]["AP"] for k, v in rows.items()}), flush=True)
    trained = ["preset:isda_tiny", "data:shapes"] if weights is not None else []  # a tiny model trained on shapes
    results["_meta"] = meta(command.strip(), [*(f"preset:{p}" for p in presets), *trained], load_before)
    page = render(results)
    atomic_write_text(args.page, page + "\n")
    atomic_write_text(args.page.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    print(page)
    return results


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
