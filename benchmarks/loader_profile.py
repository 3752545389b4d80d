"""Where a small-data training run's time goes: user, system (kernel) and wall time of ``isda train``.

    python -m benchmarks.loader_profile --budget 90 --before 9b1a7bc      # writes docs/loader_profile.json

Runs ``isda train --preset isda_tiny`` for a time budget in a child process with 2 threads, on the real nuclei
tiles at their own size (256 px, three training tiles: an epoch every 3 steps) and on a shapes dataset (128 px),
and records the child's CPU times (``resource.getrusage(RUSAGE_CHILDREN)``), its steps and, per run, the quiet-machine
record of :func:`benchmarks.quiet.measured` (each run starts settled). ``--before REV`` runs the same commands with that git revision's ``src`` first on the path, so
that before and after are measured in one invocation, alternated. ``--set KEY=VALUE`` goes to both trees' runs: an
older tree's preset may differ from today's (e.g. ``--set train.batch_size=4`` runs both at today's batch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_changes import source_of
from benchmarks.provenance import meta
from benchmarks.quiet import measured, worst
from isda.fileio import atomic_write_text


def datasets(root: Path) -> dict[str, list[str]]:
    """``isda train`` data arguments of the two datasets, prepared under ``root``."""
    from benchmarks.real_nuclei import CACHE, fetch, prepare
    from isda.data import make_shapes_dataset

    nuclei = prepare(fetch(CACHE), root / "nuclei")
    shapes = root / "shapes"
    if not (shapes / "annotations").is_dir():
        make_shapes_dataset(shapes, num_train=200, num_val=20, seed=0)
    # At their own size: the same work per step before and after (data.fit_sizes would train on smaller crops).
    own_size = [f"data.{k}" for k in ("train_short_sides=[256]", "train_max_size=256", "test_short_side=256",
                                       "test_max_size=256", "fit_sizes=false")]
    return {"nuclei_256px": ["--ann", str(nuclei["train"][0]), "--images", str(nuclei["train"][1]),
                             *[a for kv in own_size for a in ("--set", kv)]],
            "shapes_128px": ["--data", str(shapes)]}


def timed_run(src: str, data: list[str], budget_s: float, out: Path, sets: list[str] = ()) -> dict[str, Any]:
    """``isda train`` with the source tree ``src`` first on the path and ``sets`` as ``--set`` overrides; the
    child's CPU times and steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": os.pathsep.join([src, os.getcwd()])}
    command = [sys.executable, "-m", "isda", "train", "--preset", "isda_tiny", *data, "--out", str(out),
               "--set", f"train.time_budget_s={budget_s}", "--set", "train.evals_per_run=1",
               *[a for kv in sets for a in ("--set", kv)]]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    steps = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["iteration"]
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"steps": steps, "wall_s": wall, "user_s": user, "sys_s": system, "sys_share": system / (user + system)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=90.0, help="seconds of training per run")
    p.add_argument("--before", help="git revision of the 'before' code")
    p.add_argument("--root", type=Path, default=Path(".cache/loader_profile"))
    p.add_argument("--out", type=Path, default=Path("docs/loader_profile.json"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="a config override for both trees' runs (repeatable)")
    args = p.parse_args(argv)
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        trees = {"after": str(Path("src").resolve())}
        if args.before:
            trees = {"before": str(stack.enter_context(source_of(args.before))), **trees}
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for name, data in datasets(args.root).items():
            for label, src in trees.items():  # alternated: before, after on one dataset, then the next
                with measured(log=print) as timing:
                    r = timed_run(src, data, args.budget, tmp / f"{name}_{label}", args.sets)
                r["quiet"] = timing
                results.setdefault(name, {})[label] = r
                print(f"{name} {label}: {r['steps']} steps, user {r['user_s']:.0f} s, sys {r['sys_s']:.0f} s "
                      f"({100 * r['sys_share']:.0f}%), load {timing['load_before']:.2f}", flush=True)
    result = {"budget_s": args.budget, "before": args.before, "set": args.sets, "runs": results,
              "_meta": meta("python -m benchmarks.loader_profile " + " ".join(argv if argv is not None else sys.argv[1:]),
                            ["preset:isda_tiny", "data:shapes"],
                            worst([r["quiet"] for runs in results.values() for r in runs.values()]))}
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
