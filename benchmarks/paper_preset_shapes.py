"""The paper preset learning on the shapes dataset: an AP curve over a fixed number of steps.

    python -m benchmarks.paper_preset_shapes --steps 250 --every 50 --out runs/paper_shapes

``isda_r50_coco`` as it is (ResNet-50, 6 + 6 layers, 300 queries, dropout, fixed reference points, the official
losses, matching, initialisation and AdamW recipe at batch 8), with only the input reduced to the dataset's 128 px
(one scale, no crop, as the tiny preset) and the backbone trained from scratch (``--from-scratch``: BatchNorm,
nothing frozen; there are no ImageNet weights here). The lr stays constant (the paper's drops are at 64 % of 42
epochs of COCO). Training runs in chunks of ``--every`` steps, each resumed exactly from the last and followed by
COCO mask AP on the 200 validation images; the curve goes to ``OUT/curve.json``
(``points``, with the run's ``_meta``) and ``OUT/curve.png``.

Steps, not minutes: the CPU this was measured on was shared, so the step count stands for a time budget. With one
thread per run and two runs side by side (the accuracy benchmark's protocol, docs/benchmarks.md), the tiny preset
took 1.195 s per step (1508 steps in 30 minutes) and the paper preset 6.0x as long per step (measured interleaved
with the tiny preset on 8-image 128 px batches): 30 minutes are about 250 of its steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from isda import engine
from isda.config import apply_from_scratch, apply_overrides, get_preset
from isda.data.shapes import make_shapes_dataset
from isda.fileio import atomic_write_text

from .provenance import meta

OVERRIDES = {"data.train_short_sides": [128], "data.train_max_size": 192, "data.crop_prob": 0.0,
             "data.test_short_side": 128, "data.test_max_size": 192, "train.batch_size": 8, "train.num_workers": 1,
             "train.epochs": 1, "train.lr_drops": [], "train.log_every": 10}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/shapes", help="shapes dataset root (generated when missing)")
    p.add_argument("--out", default="runs/paper_shapes")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--every", type=int, default=50, help="evaluate after every this many steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="further config overrides")
    p.add_argument("--render", metavar="JSON", help="only draw the recorded figure: JSON -> the same name .png")
    args = p.parse_args(argv)
    if args.render:
        render(Path(args.render))
        return
    torch.set_num_threads(args.threads)
    paths = make_shapes_dataset(args.data)
    cfg = apply_from_scratch(get_preset("isda_r50_coco"))
    apply_overrides(cfg, {**OVERRIDES, **dict(item.split("=", 1) for item in args.set)})
    out = Path(args.out)
    command = shlex.join(["python", "-m", "benchmarks.paper_preset_shapes", *(sys.argv[1:] if argv is None else argv)])
    load_before = os.getloadavg()[0]
    curve = []
    for n in range(args.every, args.steps + args.every, args.every):
        n = min(n, args.steps)
        start = time.time()
        summary = engine.train(cfg, *paths["train"], *paths["val"], out_dir=out, resume=True, max_iters=n)
        val = summary["val"] or {}
        curve.append({"step": summary["iteration"], "AP": 100 * val.get("AP", float("nan")),
                      "AP50": 100 * val.get("AP50", float("nan")), "train_time_s": summary["train_time_s"],
                      "wall_s": time.time() - start})
        print(json.dumps(curve[-1]), flush=True)
        record = {"_meta": meta(command, ["preset:isda_r50_coco", "data:shapes"], load_before), "points": curve}
        atomic_write_text(out / "curve.json", json.dumps(record, indent=1))
        if n >= args.steps:
            break
    _plot(curve, out / "curve.png")


def _plot(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([c["step"] for c in curve], [c["AP"] for c in curve], "o-", label="isda_r50_coco (from scratch)")
    ax.set_xlabel("training steps (batch 8)")
    ax.set_ylabel("mask AP (shapes val)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(path: Path) -> None:
    """The recorded curves (docs/paper_preset_shapes.json): AP against training steps and against the CPU minutes
    those steps take at the accuracy benchmark's rates (one thread per run, two runs side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for run in data["runs"]:
        steps = [p["step"] for p in run["points"]]
        ap = [p["AP"] for p in run["points"]]
        axes[0].plot(steps, ap, run.get("style", "o-"), label=run["label"])
        axes[1].plot([s * run["seconds_per_step"] / 60 for s in steps], ap, run.get("style", "o-"), label=run["label"])
    axes[0].set_xlabel("training steps (batch 8)")
    axes[1].set_xlabel("minutes at the benchmark's CPU rate (1 thread)")
    axes[1].axvline(30, color="grey", lw=0.8, ls=":")
    for ax in axes:
        ax.set_ylabel("mask AP, shapes val (0-100)")
        ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7)
    fig.savefig(path.with_suffix(".png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
