"""``isda demo``: the whole product on a fresh machine, on CPU, in minutes.

shapes dataset (generated if absent) -> train the tiny preset under a time budget -> COCO mask AP on
the held-out split -> overlays, the reference-point figure and the curves under the run directory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import get_preset
from ..fileio import atomic_write_text

if TYPE_CHECKING:  # the engine is imported when a command runs, not for --help
    from ..engine.evaluation import EvalResult

DEMO_MINUTES = 11.0  # training budget (--minutes): the whole demo stays under 15 minutes on 2 CPU cores


def cmd_demo(args: argparse.Namespace) -> None:
    from ..data.shapes import make_shapes_dataset
    from ..engine import train
    from ..inference import draw_run

    t0 = time.time()
    out = Path(args.out)
    print(f"[1/4] shapes dataset in {args.data} (generated once)")
    paths = make_shapes_dataset(args.data)
    cfg = get_preset("isda_tiny")
    cfg.train.time_budget_s = args.minutes * 60
    cfg.train.evals_per_run = 3  # each validation of the 200 images takes ~20 s of the demo's wall time
    if (out / "last.pt").exists():
        print(f"      replacing the previous demo run in {out}")
        shutil.rmtree(out)
    budget = cfg.train.time_budget_s
    print(f"[2/4] training isda_tiny from scratch for {budget / 60:.1f} min on {args.device or 'the default device'}")
    summary = train(cfg, *paths["train"], *paths["val"], out_dir=out, device=args.device,
                    on_validation=draw_run)
    print(f"trained {summary['iteration']} iterations in {summary['train_time_s'] / 60:.1f} min")
    result, pictures = evaluate_and_draw(out, *paths["val"], args.device or "cpu", t0,
                                         {"training iterations": summary["iteration"],
                                          "training minutes": f"{summary['train_time_s'] / 60:.1f}"})
    wall = time.time() - t0
    # What the demo reports, for the docs' figures (benchmarks/demo_page.py) to read back.
    atomic_write_text(out / "summary.json", json.dumps({
        "preset": "isda_tiny", "budget_s": budget, "steps": summary["iteration"],
        "train_time_s": summary["train_time_s"], "wall_time_s": wall, "stats": result.stats}, indent=1))
    print()
    print(result.table())
    print(f"\ntotal demo time {wall / 60:.1f} min")
    for name, path in pictures.items():
        print(f"{name:>16}: {path}")


def evaluate_and_draw(out: Path, val_ann: str | Path, val_images: str | Path, device: str, t0: float,
                      summary: dict[str, Any]) -> tuple[EvalResult, dict[str, Path]]:
    """Steps 3 and 4 of the demo on a trained run directory ``out``: COCO mask AP of its best.pt on the
    validation split, the pictures, and report.html. Returns (the AP, {name: path of each picture})."""
    from ..data import CocoInstanceDataset, build_transforms
    from ..engine import evaluate
    from ..engine.evaluation import write_results_json
    from ..inference import load_trained_model, predict, query_reference_points, save_examples
    from ..report import write_run_report
    from ..visualize import plot_reference_points, plot_sampling_points

    print("[3/4] evaluating best.pt on the held-out split")
    weights = out / "best.pt" if (out / "best.pt").exists() else out / "last.pt"
    loaded = load_trained_model(weights, device)
    val = CocoInstanceDataset(val_ann, val_images, build_transforms(loaded.cfg.data, train=False), train=False)
    result, results = evaluate(loaded.model, val, device, batch_size=8, window=loaded.cfg.data.test_window)
    write_results_json(results, out / "results_val.json")

    print("[4/4] drawing predictions")
    loaded.model.record_sampling()
    pictures = {"predictions": out / "predictions.png"}
    save_examples(loaded.model, loaded.cfg.data, val, pictures["predictions"])
    image = val.load(min(5, len(val) - 1))[0].as_subclass(torch.Tensor)  # the grid's last image
    (pred,) = predict(loaded.model, loaded.cfg.data, [image.float() / 255])
    # The paper's figure: every query's reference point, coloured by its best score.
    pictures["reference points"] = out / "reference_points.png"
    plot_reference_points(*query_reference_points(loaded, image.float() / 255), pictures["reference points"],
                          image=image)
    pictures["sampling points"] = out / "sampling_points.png"
    plot_sampling_points(image, pred, loaded.class_names, pictures["sampling points"])
    if (out / "curves.png").exists():
        pictures["curves"] = out / "curves.png"
    pictures["report"] = write_run_report(
        out, title="isda demo: isda_tiny on the shapes dataset", stats=result.stats,
        per_category=result.per_category,
        summary={"weights evaluated": weights.name, **summary, "demo minutes": f"{(time.time() - t0) / 60:.1f}"})
    return result, pictures
