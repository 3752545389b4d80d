"""ONNX export benchmark: ONNX Runtime (CPU) vs PyTorch eager, and ONNX Runtime's dynamic int8 quantisation.

    python -m benchmarks.bench_onnx                               # both presets; trains a tiny model for the AP rows
    python -m benchmarks.bench_onnx --weights runs/demo/best.pt   # the AP rows from an existing shapes model
    python -m benchmarks.bench_onnx --presets isda_tiny@128x128 --repeats 3 --train-seconds 120

Per preset and size: the export (wall time, peak RSS of the exporting process, file size), then the latency of
one image through each path of :data:`PATHS` (PyTorch eager; ONNX Runtime float32 with every graph optimisation;
ONNX Runtime with the transformer's linear layers dynamically quantised to int8; ONNX Runtime with the
convolutions statically quantised as well, calibrated on ``--calib-count`` images of the shapes training split;
OpenVINO float32 when it is installed), each in its own fresh process (peak RSS its own), runs alternated and
medians reported (:func:`benchmarks.procs.compare`). ``isda_r50_coco`` has its random initialisation (seed 0);
the tiny preset the trained model when there is one. Then COCO mask AP of the trained tiny model on the shapes
validation split through every path. Writes ``docs/onnx.{md,json}`` (``--page``).

Timings are only meaningful on a quiet machine: each section waits for the load average to settle and records
the CPU time other work used while it ran (:func:`benchmarks.quiet.measured`); a section that started busy or ran
beside other work is marked invalid (the page prints "invalid: ..." and the reason instead of its figures).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from isda.fileio import atomic_write_text

from .common import INFER_SIZE, build_isda, machine_info, peak_rss_gib, set_threads
from .procs import ROOT, compare
from .provenance import meta
from .quiet import MAX_LOAD, MAX_OTHER_CPUS, measured, quiet_note, worst
from .worker import parse_size

DEFAULT_PRESETS = f"isda_r50_coco@{INFER_SIZE[0]}x{INFER_SIZE[1]},isda_tiny@128x128"
GOAL = 0.8  # ONNX Runtime latency / PyTorch eager latency (float32 both)
# path -> (runtime, file suffix after the export's stem); "eager" runs the PyTorch model.
PATHS = {"onnxruntime": ("onnxruntime", ""), "onnxruntime_int8": ("onnxruntime", "_int8"),
         "onnxruntime_int8_static": ("onnxruntime", "_int8_static"), "openvino": ("openvino", "")}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def shown(path: str | os.PathLike | None) -> str | None:
    """A path as the page prints it: relative to the repository when inside it (no machine's own directories)."""
    if path is None:
        return None
    p = Path(path).resolve()
    return str(p.relative_to(ROOT.resolve())) if p.is_relative_to(ROOT.resolve()) else str(path)


def timed(sec: dict[str, Any], text: str) -> str:
    """``text`` (a timing figure), or what the page says instead when its section was not measured quietly."""
    return text if sec.get("valid", True) else f"invalid: {sec.get('invalid_because', 'busy machine')}"


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def path_file(onnx: Path, name: str) -> Path:
    return onnx.with_name(onnx.stem + PATHS[name][1] + ".onnx")


# ---- export (a fresh process: its peak RSS is the export's) ---------------------------------------------

def export_worker(preset: str, size: tuple[int, int], out: Path, weights: str | None, threads: int,
                  calib_images: Path, calib_count: int) -> dict[str, Any]:
    from isda.config import get_preset
    from isda.deploy.onnx_export import export_model, isda_metadata, quantize_transformer
    from isda.deploy.quantize import calibration_images, quantize_int8
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
    nodes = quantize_transformer(out, path_file(out, "onnxruntime_int8"))
    int8_s = time.perf_counter() - start
    start = time.perf_counter()
    images = calibration_images(calib_images, calib_count)
    counts = quantize_int8(out, path_file(out, "onnxruntime_int8_static"), images)
    return {"export_s": info.seconds, "export_peak_rss_gib": rss, "bytes": info.size_bytes,
            "int8_s": int8_s, "int8_bytes": path_file(out, "onnxruntime_int8").stat().st_size,
            "int8_nodes": len(nodes), "int8_static_s": time.perf_counter() - start,
            "int8_static_bytes": path_file(out, "onnxruntime_int8_static").stat().st_size,
            "int8_static_nodes": counts, "calib_images": calib_count}


def run_export(preset: str, size: tuple[int, int], out: Path, weights: str | None, threads: int,
               calib_images: Path, calib_count: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_onnx", "--export-worker", preset, "--size", f"{size[0]}x{size[1]}",
           "--out", str(out), "--threads", str(threads), "--data", str(calib_images.parent),
           "--calib-count", str(calib_count)] + (["--weights", weights] if weights else [])
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"export failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- latency --------------------------------------------------------------------------------------------

def latency(preset: str, size: tuple[int, int], onnx: Path, weights: str | None, threads: int, repeats: int,
            paths: list[str], log=print) -> dict[str, Any]:
    common = ["--task", "infer", "--size", f"{size[0]}x{size[1]}", "--threads", str(threads), "--preset", preset]
    specs = {"eager": common + ["--model", "isda"] + (["--weights", weights] if weights else [])}
    for name in paths:
        specs[name] = common + ["--model", "isda_onnx", "--onnx", str(path_file(onnx, name)),
                                "--runtime", PATHS[name][0]]
    out = compare(specs, repeats=repeats, warmup=1, log=log)
    eager = out["eager"]["time"]["median"]
    for name in paths:
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


def accuracy(weights: str, onnx: Path, data: Path, threads: int, paths: list[str]) -> dict[str, Any]:
    from isda.data import CocoInstanceDataset, build_transforms
    from isda.engine import evaluate
    from isda.inference import load_trained_model

    set_threads(threads)
    rows = {}
    for name in ["eager", *paths]:
        path, runtime = (weights, "onnxruntime") if name == "eager" else (path_file(onnx, name), PATHS[name][0])
        loaded = load_trained_model(path, runtime=runtime)
        dataset = CocoInstanceDataset(data / "annotations" / "instances_val.json", data / "val",
                                      build_transforms(loaded.cfg.data, train=False), train=False)
        start = time.perf_counter()
        result, _ = evaluate(loaded.model, dataset, "cpu", window=loaded.cfg.data.test_window)
        rows[name] = {"stats": result.stats, "seconds": time.perf_counter() - start, "images": len(dataset)}
    return rows


# ---- page -----------------------------------------------------------------------------------------------

def _openvino_verdict(lat: dict[str, Any], sec: dict[str, Any]) -> str:
    """Whether OpenVINO earns a place beside ONNX Runtime on this preset: its time as a multiple of ORT's."""
    if "openvino" not in lat:
        return ""
    ratio = lat["openvino"]["time"]["median"] / lat["onnxruntime"]["time"]["median"]
    verdict = ("faster than ONNX Runtime here" if ratio < 1 else
               "slower than ONNX Runtime here, so `isda predict` keeps ONNX Runtime as the default")
    return " " + timed(sec, f"OpenVINO float32 takes {ratio:.2f}x ONNX Runtime's time: {verdict}.")


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = ["# ONNX export: ONNX Runtime and OpenVINO vs PyTorch eager (CPU)", "",
             f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, onnxruntime {results['onnxruntime']}"
             + (f", openvino {results['openvino']}" if results.get("openvino") else "")
             + f"; measured {results['_meta']['date']}. Command: `{results['_meta']['command']}`.", "",
             "Each path runs in its own fresh process (peak RSS = `ru_maxrss` of that process, model included), one "
             "image, runs alternated, medians. onnxruntime: float32, every graph optimisation. onnxruntime_int8: "
             "ONNX Runtime's dynamic quantisation of the transformer's linear layers "
             "(`isda.deploy.onnx_export.quantize_transformer`). onnxruntime_int8_static: that plus the backbone's, "
             "neck's and mask features' convolutions statically quantised (`isda.deploy.quantize.quantize_int8`, "
             "`isda export --int8`). openvino: the float32 file in OpenVINO (`--runtime openvino`).",
             f"Each section waited for the 1-minute load average to settle to {MAX_LOAD} and counted the CPU time other "
             f"work used while it ran; one that started busy or ran beside more than {MAX_OTHER_CPUS} CPUs of other "
             "work is marked invalid.", ""]
    for key, sec in results["presets"].items():
        lat, exp = sec["latency"], sec["export"]
        lines += [f"## {key}" + (" (trained on shapes)" if sec.get("weights") else " (random initialisation)"), "",
                  "| path | median | min | max | runs | ratio to eager | peak RSS |", "|---|---|---|---|---|---|---|"]
        for name in lat:
            t = lat[name]["time"]
            ratio = lat[name].get("ratio_to_eager", 1.0)
            cells = [*(timed(sec, f"{t[k]:.3f} s") for k in ("median", "min", "max")), str(t["n"]),
                     timed(sec, f"**{ratio:.2f}**"), f"{lat[name]['peak_rss_gib']:.2f} GiB"]
            lines.append("| " + " | ".join([name, *cells]) + " |")
        static = exp.get("int8_static_nodes")
        goal = lat["onnxruntime"]["ratio_to_eager"]
        lines += ["", timed(exp, f"Export: {exp['export_s']:.1f} s, peak RSS {exp['export_peak_rss_gib']:.2f} GiB")
                  + f", {exp['bytes'] / 2**20:.1f} MiB; int8 quantisation "
                  + timed(exp, f"{exp['int8_s']:.1f} s") + f" ({exp['int8_nodes']} MatMul/Gemm nodes), "
                  f"{exp['int8_bytes'] / 2**20:.1f} MiB"
                  + (f"; static int8 {timed(exp, format(exp['int8_static_s'], '.1f') + ' s')} ("
                     + ", ".join(f"{n} {kind}" for kind, n in static.items())
                     + f"; {exp['calib_images']} calibration images), {exp['int8_static_bytes'] / 2**20:.1f} MiB"
                     if static else "")
                  + f". Goal ONNX Runtime <= {GOAL} x eager: "
                  + timed(sec, f"**{'met' if goal <= GOAL else 'not met'}** ({goal:.2f})") + "."
                  + _openvino_verdict(lat, sec),
                  f"<sub>export: {quiet_note(exp)}; latency runs: {quiet_note(sec)}.</sub>", ""]
    if results.get("accuracy"):
        acc = results["accuracy"]
        lines += ["## Mask AP on the shapes validation split (isda_tiny)", "",
                  f"Model: `{acc['weights']}`. AP on the 0-100 scale.", "",
                  "| path | AP | AP50 | AP75 | eval time |", "|---|---|---|---|---|"]
        for name, row in acc["rows"].items():
            s = row["stats"]
            lines.append(f"| {name} | {100 * s['AP']:.2f} | {100 * s['AP50']:.2f} | {100 * s['AP75']:.2f} | "
                         f"{timed(acc, format(row['seconds'], '.1f') + ' s')} ({row['images']} images) |")
        lines += ["", f"<sub>{quiet_note(acc)}.</sub>", ""]
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
    p.add_argument("--calib-count", type=int, default=8, help="static int8: calibration images (shapes train split)")
    p.add_argument("--page", type=Path, default=ROOT / "docs" / "onnx.md")
    p.add_argument("--export-worker", metavar="PRESET", help=argparse.SUPPRESS)
    p.add_argument("--size", type=parse_size, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.export_worker:
        print(json.dumps(export_worker(args.export_worker, args.size, args.out, args.weights, args.threads,
                                       args.data / "train", args.calib_count)))
        return None

    import onnxruntime

    def log(text: str) -> None:
        print(text, flush=True)

    args.work.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.bench_onnx " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    results: dict[str, Any] = {"machine": machine_info(args.threads), "onnxruntime": onnxruntime.__version__,
                               "presets": {}}
    presets = [item.partition("@")[0] for item in args.presets.split(",")]
    paths = [name for name in PATHS if PATHS[name][0] != "openvino" or openvino_available()]
    if openvino_available():
        import openvino

        results["openvino"] = openvino.__version__
    if not (args.data / "train").is_dir():  # the calibration images of the static int8 path
        subprocess.run([sys.executable, "-m", "isda", "shapes", str(args.data)], cwd=ROOT, env=_env(), check=True)
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
        onnx = args.work / f"{preset}_{size[0]}x{size[1]}.onnx"
        with measured(log=log) as timing:
            export = run_export(preset, size, onnx, own, args.threads, args.data / "train", args.calib_count)
        export.update(timing)
        print(f"  {export['export_s']:.1f} s, {export['bytes'] / 2**20:.1f} MiB; latency", flush=True)
        with measured(log=log) as timing:
            lat = latency(preset, size, onnx, own, args.threads, args.repeats, paths, log=log)
        results["presets"][key] = {"export": export, "latency": lat, "weights": shown(own), **timing}
        print("  ratio to eager: " + ", ".join(f"{name} {lat[name]['ratio_to_eager']:.2f}" for name in paths)
              + ("" if timing["valid"] else f" (invalid: {timing['invalid_because']})"), flush=True)
    if weights is not None and not args.no_accuracy:
        onnx = args.work / "isda_tiny_accuracy.onnx"
        run_export("isda_tiny", (133, 181), onnx, weights, args.threads, args.data / "train", args.calib_count)
        with measured(log=log) as timing:
            rows = accuracy(weights, onnx, args.data, args.threads, paths)
        results["accuracy"] = {"weights": shown(weights), "rows": rows, **timing}
        print(json.dumps({k: v["stats"]["AP"] for k, v in rows.items()}), flush=True)
    # What is measured: each preset's network and input size, and the runtimes' agreement on a tiny model trained on
    # shapes (whatever recipe trained it): not the losses or the training recipe.
    trained = ["preset:isda_tiny:model,data", "data:shapes"] if weights is not None else []
    sections = [s for sec in results["presets"].values() for s in (sec, sec["export"])] + \
        ([results["accuracy"]] if "accuracy" in results else [])
    results["_meta"] = meta(command.strip(), [*(f"preset:{p}:model,data" for p in presets), *trained],
                            worst(sections))
    page = render(results)
    atomic_write_text(args.page, page + "\n")
    atomic_write_text(args.page.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    print(page)
    return results


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
