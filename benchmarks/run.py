"""ISDA vs torchvision Mask R-CNN on CPU: ``make bench`` (quick) and ``make bench-full`` (writes the page).

    python -m benchmarks.run --quick                 # a minute or two; prints, writes runs/bench/quick.json
    python -m benchmarks.run --full                  # everything; writes docs/benchmarks.{md,json,png}
    python -m benchmarks.run --full --skip accuracy  # the timing sections only (the page keeps the rest)
    python -m benchmarks.run --render                # re-render docs/benchmarks.md (and the accuracy section's derived
                                                     # figures) from docs/benchmarks.json

Sections: inference (latency, peak RSS, per-component time), train (one AdamW step); both also with the two
models under CPU bfloat16 autocast (``_bf16`` rows, unless --no-bf16), msda (deformable
attention core vs the textbook implementation), before_after (this tree against the git revision before
the optimisations, ``--before REV``), profile (torch.profiler top operators of an inference and a training
step), accuracy (ISDA tiny vs a Mask R-CNN tuned with the same effort
under the same CPU budget: sweep on the tune split, test split, a held-out generated family, the paper's
ablations; full mode only unless --accuracy-budget is given).

Every comparison is one run on one machine with the sides alternated run by run, and reports medians.
Timings are only meaningful on a quiet machine: the load average is recorded with each section.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from isda.fileio import atomic_write_text

from .common import INFER_SIZE, TRAIN_SIZE, bf16_matrix_units, machine_info, set_threads
from .derived import accuracy_summary, choice_records
from .provenance import meta
from .quiet import measured

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("inference", "train", "msda", "before_after", "profile", "accuracy")
QUICK = {"repeats": 3, "components": 1, "msda_repeats": 3, "before_after_repeats": 3}
FULL = {"repeats": 7, "components": 3, "msda_repeats": 7, "before_after_repeats": 5}


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def _fmt_size(size) -> str:
    return f"{size[0]}x{size[1]}"


def section_inference(args, log) -> dict[str, Any]:
    from .procs import compare

    common = ["--task", "infer", "--size", _fmt_size(args.infer_size), "--threads", str(args.threads)]
    # Mask R-CNN stock (torchvision as shipped) and with ISDA's generic speed-ups (the headline: the same effort).
    specs = {"isda": [*common, "--model", "isda", "--preset", args.preset], "maskrcnn": [*common, "--model", "maskrcnn"],
             "maskrcnn_eq": [*common, "--model", "maskrcnn", "--speedups"]}
    specs.update(_bf16_specs(args, specs, ("isda", "maskrcnn_eq")))
    res = compare(specs, repeats=args.repeats, components=args.components, log=log)
    isda = res["isda"]
    res["ratio_latency"] = isda["time"]["median"] / res["maskrcnn_eq"]["time"]["median"]
    res["ratio_peak_rss"] = isda["peak_rss_gib"] / res["maskrcnn_eq"]["peak_rss_gib"]
    res["ratio_latency_stock"] = isda["time"]["median"] / res["maskrcnn"]["time"]["median"]
    res["ratio_peak_rss_stock"] = isda["peak_rss_gib"] / res["maskrcnn"]["peak_rss_gib"]
    res["size"] = list(args.infer_size)
    log(f"  inference ratio ISDA / Mask R-CNN with the same speed-ups: latency {res['ratio_latency']:.2f}, peak RSS "
        f"{res['ratio_peak_rss']:.2f} (stock Mask R-CNN: {res['ratio_latency_stock']:.2f}, {res['ratio_peak_rss_stock']:.2f})")
    if "isda_bf16" in res:
        res["ratio_latency_bf16"] = res["isda_bf16"]["time"]["median"] / res["maskrcnn_eq_bf16"]["time"]["median"]
        res["ratio_peak_rss_bf16"] = res["isda_bf16"]["peak_rss_gib"] / res["maskrcnn_eq_bf16"]["peak_rss_gib"]
        _bf16_speedups(res, ("isda", "maskrcnn_eq"))
        log(f"  bf16: ISDA / Mask R-CNN with the same speed-ups: latency {res['ratio_latency_bf16']:.2f}; bf16 speed-up "
            f"(fp32 / bf16) ISDA {res['bf16_speedup_isda']:.2f}, Mask R-CNN {res['bf16_speedup_maskrcnn_eq']:.2f}")
    return res


def _bf16_specs(args, specs: dict[str, list[str]], names: tuple[str, ...]) -> dict[str, list[str]]:
    """``NAME_bf16``: worker NAME again under CPU bfloat16 autocast, the same switch for every model (none with
    --no-bf16)."""
    return {} if args.no_bf16 else {f"{n}_bf16": [*specs[n], "--precision", "bf16"] for n in names}


def _bf16_speedups(res: dict[str, Any], names: tuple[str, ...]) -> None:
    """``bf16_speedup_NAME``: NAME's float32 median time / its bf16 one (> 1: bf16 is faster); and whether the CPU
    has bfloat16 matrix units (``benchmarks.common.bf16_matrix_units``)."""
    for n in names:
        res[f"bf16_speedup_{n}"] = res[n]["time"]["median"] / res[f"{n}_bf16"]["time"]["median"]
    res["bf16_matrix_units"] = bf16_matrix_units()


def section_train(args, log) -> dict[str, Any]:
    from .procs import compare

    common = ["--task", "train", "--size", _fmt_size(args.train_size), "--batch", "2", "--threads", str(args.threads)]
    specs = {"isda": [*common, "--model", "isda", "--preset", args.preset],
             "maskrcnn_frozen": [*common, "--model", "maskrcnn_frozen"],
             # the same recipe with ISDA's generic speed-ups (in training: the frozen BatchNorm folded): the headline
             "maskrcnn_frozen_eq": [*common, "--model", "maskrcnn_frozen", "--speedups"],
             "maskrcnn": [*common, "--model", "maskrcnn"]}
    if args.quick:
        specs.pop("maskrcnn")
    specs.update(_bf16_specs(args, specs, ("isda", "maskrcnn_frozen_eq")))
    res = compare(specs, repeats=args.repeats, log=log)
    for name in ("maskrcnn_frozen", "maskrcnn_frozen_eq", "maskrcnn"):
        if name in res:
            res[f"ratio_{name}"] = res["isda"]["time"]["median"] / res[name]["time"]["median"]
    if "isda_bf16" in res:  # both sides in bf16: ISDA bf16 / same-recipe Mask R-CNN bf16 with the same speed-ups
        res["ratio_maskrcnn_frozen_eq_bf16"] = res["isda_bf16"]["time"]["median"] / res["maskrcnn_frozen_eq_bf16"]["time"]["median"]
        _bf16_speedups(res, ("isda", "maskrcnn_frozen_eq"))
    res["size"] = list(args.train_size)
    log("  train step ratio ISDA / Mask R-CNN: " + ", ".join(f"{k[6:]} {v:.2f}" for k, v in res.items() if k.startswith("ratio_")))
    return res


def section_msda(args, log) -> dict[str, Any]:
    from . import bench_msda

    return bench_msda.run(repeats=args.msda_repeats, log=log)


def section_before_after(args, log) -> dict[str, Any]:
    from . import bench_changes

    return bench_changes.run(args.before or bench_changes.BEFORE_OPTIMISATIONS, repeats=args.before_after_repeats, infer_size=args.infer_size,
                             train_size=args.train_size, preset=args.preset, threads=args.threads, log=log)


def section_profile(args, log) -> dict[str, Any]:
    """torch.profiler of one ISDA inference and one training step, and of one training step of Mask R-CNN
    (same frozen-backbone recipe)."""
    from .worker import Task

    def step(task: str, model: str, size) -> Any:
        return Task(argparse.Namespace(task=task, model=model, size=_fmt_size(size), preset=args.preset, batch=2,
                                       seed=0, weights=None, speedups=False, precision="fp32")).run

    runs = {"after": step("infer", "isda", args.infer_size), "train_after": step("train", "isda", args.train_size),
            "train_maskrcnn_frozen": step("train", "maskrcnn_frozen", args.train_size)}
    out: dict[str, Any] = {"size": list(args.infer_size), "train_size": list(args.train_size)}
    for name, fn in runs.items():
        out[name] = _profile_top(fn)
        log(f"  profile {name}: {_top_line(out[name])}")
    return out


def _profile_top(fn, top: int = 15) -> dict[str, Any]:
    """One warm-up call, then one profiled call of ``fn``: wall time, total self CPU time and the operators
    with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"wall_s": wall, "self_cpu_s": total / 1e6,
            "top": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
                     "calls": e.count} for e in ranked]}


def _top_line(profile: dict[str, Any]) -> str:
    return f"{profile['wall_s']:.2f} s wall; top: " + ", ".join(
        f"{t['op']} {100 * t['share']:.0f}%" for t in profile["top"][:6])


def section_accuracy(args, log, previous: dict[str, Any] | None = None, choice: dict[str, Any] | None = None,
                     save=None) -> dict[str, Any]:
    from . import bench_accuracy

    return bench_accuracy.run(ROOT / "runs" / "bench", args.budgets, args.variant_budgets,
                              num_train=args.num_train, num_val=args.num_val, parts=args.parts,
                              sweep_budget_s=args.sweep_budget, heldout_budgets_s=args.heldout_budgets,
                              seeds=args.seeds, sweep_entries=args.sweep_entries, jobs=args.jobs, threads=args.threads,
                              variants=args.variants, variant_seeds=args.variant_seeds, previous=previous,
                              choice=choice, save=save, speedups=args.speedups, heldout_fit=not args.no_heldout_fit,
                              heldout_fixed=not args.no_heldout_fixed, heldout_maskrcnn=args.heldout_maskrcnn,
                              models=args.models, log=log)


def depends_on(section: str, args) -> list[str]:
    """The fingerprints (benchmarks.provenance) a section's figures depend on."""
    preset = f"preset:{args.preset}"
    return {"inference": [f"{preset}:model,data"], "train": [preset, "data:shapes"], "msda": [], "before_after": [preset, "data:shapes"],
            "profile": [preset, "data:shapes"],
            # the held-out family too when this invocation skips it: the section keeps the earlier runs
            "accuracy": ["preset:isda_tiny", "data:shapes", "data:heldout"]}[section]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer repeats; no page (default)")
    mode.add_argument("--full", action="store_true", help="all sections, more repeats, writes the page")
    mode.add_argument("--render", action="store_true", help="only re-render the page from its JSON")
    p.add_argument("--only", default="", help=f"comma-separated sections ({', '.join(SECTIONS)})")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, help="timed runs per side (inference, train)")
    p.add_argument("--components", type=int, help="component-breakdown runs per model")
    p.add_argument("--msda-repeats", type=int)
    p.add_argument("--before-after-repeats", type=int)
    p.add_argument("--before", default=None, help="before_after: the git revision to compare this tree with "
                   "(default: benchmarks.bench_changes.BEFORE_OPTIMISATIONS)")
    p.add_argument("--infer-size", type=_size, default=INFER_SIZE, help="HxW (default 800x1216)")
    p.add_argument("--train-size", type=_size, default=TRAIN_SIZE, help="HxW (default 512x512)")
    p.add_argument("--preset", default="isda_r50_coco")
    p.add_argument("--no-bf16", action="store_true", help="inference, train: leave out the bf16 rows (both models "
                   "again under CPU bfloat16 autocast), e.g. on a CPU without bfloat16 matrix units")
    p.add_argument("--budgets", default="480,1800", help="accuracy: training-time budgets, seconds")
    p.add_argument("--variant-budgets", default="480", help="accuracy: budgets of the ablation, lever and seed runs, "
                   "seconds (comma-separated; empty: none)")
    p.add_argument("--accuracy-budget", type=float, default=0.0,
                   help="quick mode: run the accuracy section with this one budget (e.g. 30) on a small dataset")
    p.add_argument("--jobs", type=int, default=1,
                   help="accuracy: training runs at once, threads/jobs threads each (e.g. 2 on 2 cores: 1 thread each)")
    p.add_argument("--variants", default="", help="accuracy: only these ablation/lever/seed runs (comma-separated "
                   "names from benchmarks/bench_accuracy.py; name@seconds: at that budget only), e.g. hybrid_matching,no_mask_bce@1800")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=200)
    p.add_argument("--parts", default="sweep,test,heldout,variants",
                   help="accuracy: which parts (sweep: both recipes on the tune split; test: --budgets x --seeds on "
                   "the test split; heldout: the second generated family; variants: ISDA's ablations and levers; "
                   "tune_levers / heldout_levers: the recipe alone and with each lever on tune / the held-out family)")
    p.add_argument("--sweep-budget", type=float, default=180.0, help="accuracy: seconds per sweep run")
    p.add_argument("--heldout-budgets", default="480", help="accuracy: budgets of the held-out family runs, seconds")
    p.add_argument("--models", default="isda,maskrcnn", help="accuracy: the models the test and held-out parts "
                   "train (isda alone after its preset changed: Mask R-CNN's earlier runs are kept)")
    p.add_argument("--no-heldout-fit", action="store_true", help="accuracy: leave out the held-out runs of ISDA "
                   "with data.fit_sizes (only the two models side by side)")
    p.add_argument("--no-heldout-fixed", action="store_true", help="accuracy: leave out the held-out runs of ISDA "
                   "at the fixed 128 px input (Mask R-CNN side by side with ISDA's default, data.fit_sizes on)")
    p.add_argument("--heldout-maskrcnn", default="maskrcnn", type=lambda v: tuple(x for x in v.split(",") if x),
                   help="accuracy: Mask R-CNN's held-out runs: maskrcnn (the fixed 128 px input), maskrcnn_fit "
                   "(data.fit_sizes, beside ISDA's fitted runs), or both, comma-separated")
    p.add_argument("--seeds", default="0,1", help="accuracy: seeds of the test-split runs")
    p.add_argument("--speedups", default="", help="accuracy: generic speed-ups given to both models in every run after "
                   "the sweep (names from benchmarks.bench_accuracy.SPEEDUPS, comma-separated), e.g. bf16")
    p.add_argument("--variant-seeds", default="0", help="accuracy: seeds of each ablation/lever run (e.g. 0,1)")
    p.add_argument("--sweep-entries", default="", help="accuracy: only these sweep entries (names from "
                   "benchmarks/bench_accuracy.py, '|'-separated), e.g. to re-run those a busy machine slowed down")
    p.add_argument("--json", type=Path, help="results file (default docs/benchmarks.json, quick: runs/bench/quick.json)")
    p.add_argument("--page", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args(argv)
    args.quick = not (args.full or args.render)
    args.budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    args.variant_budgets = [float(b) for b in args.variant_budgets.split(",") if b.strip() and float(b) > 0]
    args.variants = args.variants.split(",") if args.variants else None
    args.sweep_entries = args.sweep_entries.split("|") if args.sweep_entries else None
    args.parts = tuple(x for x in args.parts.split(",") if x)
    args.heldout_budgets = [float(b) for b in args.heldout_budgets.split(",") if b.strip()]
    args.seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
    args.speedups = tuple(x for x in args.speedups.split(",") if x)
    args.models = tuple(x for x in args.models.split(",") if x)
    args.variant_seeds = tuple(int(x) for x in args.variant_seeds.split(",") if x.strip())
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    json_path = args.json or (ROOT / "runs" / "bench" / "quick.json" if args.quick else args.page.with_suffix(".json"))

    if args.render:
        from .report import render

        results = json.loads(json_path.read_text())
        acc = results.get("sections", {}).get("accuracy")
        if acc and "seeds" in acc:  # the derived figures again from the stored runs, as the derived code says now
            acc["summary"] = accuracy_summary(acc)
            atomic_write_text(json_path, json.dumps(results, indent=1))
        render(results, args.page)
        print(f"wrote {args.page} and {args.page.with_suffix('.png')}")
        return {}

    sections = [s for s in (args.only.split(",") if args.only else SECTIONS) if s]
    skip = {s for s in args.skip.split(",") if s}
    unknown = (set(sections) | skip) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.quick and not args.only:
        sections = [s for s in sections if s not in ("before_after", "profile")]
        if args.accuracy_budget <= 0:
            sections.remove("accuracy")
    if args.quick and args.accuracy_budget > 0:
        args.budgets, args.variant_budgets, args.parts, args.seeds = [args.accuracy_budget], [], ("test",), (0,)
        args.num_train, args.num_val = min(args.num_train, 200), min(args.num_val, 50)
    sections = [s for s in sections if s not in skip]
    if "accuracy" in sections:
        from .bench_accuracy import PARTS, plan_variants

        if set(args.parts) - set(PARTS):
            p.error(f"unknown --parts {sorted(set(args.parts) - set(PARTS))}; choose from {', '.join(PARTS)}")
        from .bench_accuracy import MODELS, SPEEDUPS

        if not args.models or set(args.models) - set(MODELS):
            p.error(f"unknown --models {','.join(args.models) or '(none)'}; choose from {', '.join(MODELS)}")
        if set(args.speedups) - set(SPEEDUPS):
            p.error(f"unknown --speedups {sorted(set(args.speedups) - set(SPEEDUPS))}; choose from {', '.join(SPEEDUPS)}")
        try:  # a typo in --variants is a usage error now, not a traceback after an hour of training
            plan_variants(args.variants, args.variant_budgets)
        except ValueError as e:
            p.error(str(e))

    set_threads(args.threads)
    results: dict[str, Any] = {}
    if json_path.exists() and not args.quick:
        results = json.loads(json_path.read_text())  # keep the sections not rerun
    results["machine"] = machine_info(args.threads)
    results["mode"] = "quick" if args.quick else "full"
    results.setdefault("sections", {})
    argv_text = shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"benchmarks ({results['mode']}): {', '.join(sections)}; {args.threads} threads; "
          f"{results['machine']['cpu']}; load average {os.getloadavg()[0]:.2f} (each section waits for it to settle)")

    def store(name: str, data: dict[str, Any], start: float, timing: dict[str, Any]) -> None:
        data["_meta"] = {**meta(f"python -m benchmarks.run {argv_text}".strip(), depends_on(name, args), timing),
                         "seconds": round(time.time() - start, 1), "threads": args.threads,
                         "cpu": results["machine"]["cpu"]}  # the page mixes invocations, maybe machines
        if name == "accuracy":  # the seed means and differences the pages quote; what each run records itself
            from .bench_accuracy import RECORDED_PER_RUN

            data["summary"] = accuracy_summary(data)
            data["_meta"]["recorded_per_run"] = [f"{section}.{field}" for section, fields in RECORDED_PER_RUN.items()
                                                 for field in fields]
        results["sections"][name] = data
        json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json_path, json.dumps(results, indent=1))

    for name in sections:
        print(f"[{name}]")
        with measured(settle_first=not args.quick, log=print) as timing:
            start, extra = time.time(), {}
            if name == "accuracy":  # merged into the page's earlier runs; saved after every finished training run
                swept = [c for c in choice_records(results["sections"]) if c.get("sweep")]
                extra = {"previous": results["sections"].get("accuracy"), "choice": swept[-1] if swept else None,
                         "save": lambda data, name=name, start=start, t=timing: store(name, data, start, t)}
            data = globals()[f"section_{name}"](args, print, **extra)
        store(name, data, start, timing)
    print(f"results: {json_path}")
    if not args.quick:
        from .report import render

        render(results, args.page)
        print(f"wrote {args.page} and {args.page.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
