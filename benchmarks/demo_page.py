"""The demo's figures for the docs: ``docs/demo.json`` and ``docs/demo_predictions.png`` from an ``isda demo`` run.

    python -m benchmarks.demo_page --run                 # run `isda demo` (2 threads) into runs/demo first
    python -m benchmarks.demo_page --run-dir runs/demo   # from a finished demo run

``docs/demo.json`` = ``{"demo": {"_meta": ..., "ap": mask AP (0-100), "ap50": ..., "steps": ..., "train_minutes":
..., "wall_minutes": ...}}``, read from the ``summary.json`` the demo saves; pages quote it with markers
(``<!-- fig docs/demo.json demo.ap .1f -->``, see benchmarks/figures.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from isda.fileio import atomic_write_bytes, atomic_write_text

from .provenance import ROOT, meta
from .quiet import measured

THREADS = 2
COMMAND = "python -m benchmarks.demo_page --run"


def figures(run_dir: Path) -> dict[str, Any]:
    """The figures of a finished demo run (its ``summary.json``); SystemExit naming the file when it is missing
    or incomplete."""
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
        return {"ap": 100 * summary["stats"]["AP"], "ap50": 100 * summary["stats"]["AP50"],
                "steps": int(summary["steps"]), "train_minutes": summary["train_time_s"] / 60,
                "wall_minutes": summary["wall_time_s"] / 60}
    except FileNotFoundError:
        raise SystemExit(f"{path} not found: run `isda demo --out {run_dir}` first, or pass --run") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not a demo summary ({type(e).__name__}: {e})") from None


def write(run_dir: Path, docs: Path, timing: dict[str, Any] | None = None) -> dict[str, Any]:
    """docs/demo.json and docs/demo_predictions.png from ``run_dir`` (``timing``: the run's
    :func:`benchmarks.quiet.measured` record); returns the JSON written."""
    run_dir, docs = Path(run_dir), Path(docs)
    picture = run_dir / "predictions.png"
    if not picture.is_file():
        raise SystemExit(f"{picture} not found: not a finished demo run")
    data = {"demo": {"_meta": meta(COMMAND, ["preset:isda_tiny", "data:shapes"], timing), **figures(run_dir)}}
    atomic_write_bytes(docs / "demo_predictions.png", picture.read_bytes())
    atomic_write_text(docs / "demo.json", json.dumps(data, indent=1) + "\n")
    return data


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="the demo's run directory")
    p.add_argument("--run", action="store_true", help=f"run `isda demo` ({THREADS} threads) into --run-dir first")
    args = p.parse_args(argv)
    timing = None
    if args.run:
        import torch

        from isda.cli import main as isda

        torch.set_num_threads(THREADS)
        with measured(log=print) as timing:
            if isda(["demo", "--out", str(args.run_dir)]) != 0:
                raise SystemExit("isda demo failed")
    docs = ROOT / "docs"
    data = write(args.run_dir, docs, timing)
    print(json.dumps({k: v for k, v in data["demo"].items() if k != "_meta"}))
    print(f"wrote {docs / 'demo.json'} and {docs / 'demo_predictions.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
