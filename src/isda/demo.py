"""``isda demo``: the whole product on a fresh machine, on CPU, in minutes.

shapes dataset (generated if absent) -> train the tiny preset under a time budget -> COCO mask AP on
the held-out split -> overlays, the reference-point figure and the curves under the run directory.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import time
from pathlib import Path

import torch

from .config import get_preset

DEMO_MINUTES = 11.0  # training budget: the whole demo stays under 15 minutes on 2 CPU cores


def cmd_demo(args: argparse.Namespace) -> None:
    from .data import CocoInstanceDataset, build_transforms
    from .data.shapes import make_shapes_dataset
    from .engine import evaluate, train
    from .engine.evaluation import write_results_json
    from .inference import draw_examples, draw_run, load_trained_model, predict_and_draw, query_reference_points
    from .visualize import plot_reference_points, save_grid, save_png

    t0 = time.time()
    out = Path(args.out)
    print(f"[1/4] shapes dataset in {args.data} (generated once)")
    paths = make_shapes_dataset(args.data)
    cfg = get_preset("isda_tiny")
    cfg.train.time_budget_s = (args.minutes if args.minutes is not None else DEMO_MINUTES) * 60
    if (out / "last.pt").exists():
        print(f"      replacing the previous demo run in {out}")
        shutil.rmtree(out)
    budget = cfg.train.time_budget_s
    print(f"[2/4] training isda_tiny from scratch for {budget / 60:.1f} min on {args.device or 'the default device'}")
    summary = train(cfg, *paths["train"], *paths["val"], out_dir=out, device=args.device,
                    on_validation=functools.partial(draw_run, data_cfg=cfg.data))

    print("[3/4] evaluating best.pt on the held-out split")
    weights = out / "best.pt" if (out / "best.pt").exists() else out / "last.pt"
    loaded = load_trained_model(weights, args.device or "cpu")
    val = CocoInstanceDataset(*paths["val"], build_transforms(loaded.cfg.data, train=False), train=False)
    result, results = evaluate(loaded.model, val, args.device or "cpu", batch_size=8)
    write_results_json(results, out / "results_val.json")

    print("[4/4] drawing predictions")
    loaded.model.record_sampling()
    drawn = draw_examples(loaded.model, loaded.cfg.data, val, loaded.class_names)
    image = val.load(len(drawn) - 1)[0].as_subclass(torch.Tensor)
    _, sampled = predict_and_draw(loaded.model, loaded.cfg.data, image, loaded.class_names, reference_points=False,
                                  sampling_points=True)
    pictures = {"predictions": out / "predictions.png"}
    save_grid(drawn, pictures["predictions"])
    # The seed's figure: every query's reference point on the last image, coloured by its best score.
    pictures["reference points"] = out / "reference_points.png"
    plot_reference_points(*query_reference_points(loaded, image.float() / 255), pictures["reference points"],
                          image=image)
    pictures["sampling points"] = out / "sampling_points.png"
    save_png(sampled, pictures["sampling points"])
    pictures["curves"] = out / "curves.png"

    print()
    print(result.table())
    print(f"\ntrained {summary['iteration']} iterations in {summary['train_time_s'] / 60:.1f} min; "
          f"total demo time {(time.time() - t0) / 60:.1f} min")
    for name, path in pictures.items():
        print(f"{name:>16}: {path}")
