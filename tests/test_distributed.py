"""Distributed training: 2 gloo processes under torchrun match one process with the same global batch.

Run by pytest; torchrun also runs this file as a script (the ``__main__`` block) for each worker.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from isda.engine import distributed
from isda.config import load_config, save_config
from isda.engine import train

from engine_utils import shapes, single_thread, tiny_config


def test_helpers_are_no_ops_in_a_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_distributed("cpu") == torch.device("cpu")
    assert not distributed.is_distributed()
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.is_main_process()) == (0, 1, True)
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_reduce_mean(x), x)
    assert distributed.broadcast_flag(True, torch.device("cpu")) is True
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_object(3) == [3]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    data = shapes(tmp_path / "shapes")
    # Frozen BatchNorm: trainable BN statistics would differ between per-process and global batches.
    # One image size (no padding differences); random flips stay, since augmentation is seeded per sample.
    # A huge time budget (the run's length; --max-iters ends it after 2 epochs) exercises the per-step stop and
    # validation broadcasts of rank 0's clock.
    # A frozen backbone trains only from weights (require_backbone_init): a random torchvision ResNet-18 file.
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    # Query denoising off: each process draws its own noise, so the two runs would train on different queries.
    common = {"backbone_norm": "frozen_bn", "backbone_weights": str(weights), "train_short_sides": [64],
              "crop_prob": 0, "time_budget_s": 1e6, "denoising_groups": 0}
    ddp_cfg = tiny_config(batch_size=2, **common)
    save_config(ddp_cfg, tmp_path / "ddp.yaml")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               str(tmp_path / "ddp.yaml"), *map(str, data["train"]), *map(str, data["val"]), str(tmp_path / "ddp")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run(command, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    single_cfg = tiny_config(batch_size=4, **common)
    with single_thread():
        train(single_cfg, *data["train"], *data["val"], out_dir=tmp_path / "single", max_iters=4, log=lambda _m: None)
        train(single_cfg, *data["train"], out_dir=tmp_path / "init", max_iters=0, log=lambda _m: None)

    ddp, single, init = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("ddp", "single", "init"))
    assert ddp["iteration"] == single["iteration"] == 4 and init["iteration"] == 0 and ddp["world_size"] == 2
    assert len(ddp["rng"]) == 2  # every rank's RNG state
    # Adam turns float noise in near-zero gradients (summation order) into visible weight noise, so compare
    # the whole update: here ~2e-4 relative, against ~0.2 when the instance normaliser is not all-reduced.
    keys = [k for k, v in single["model"].items() if v.is_floating_point()]
    difference = torch.cat([(ddp["model"][k] - single["model"][k]).flatten() for k in keys]).norm()
    update = torch.cat([(single["model"][k] - init["model"][k]).flatten() for k in keys]).norm()
    assert difference / update < 1e-2
    # Logged losses are averaged over ranks; with the all-reduced instance normaliser they equal the
    # single-process loss of the same global batch: the first step's exactly (same weights, only the summation
    # order differs), the later ones as closely as the weights agree (the Adam noise above, ~1e-4 relative).
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("ddp", "single")}
    ddp_losses = [r["loss"] for r in rows["ddp"] if r["type"] == "train"]
    single_losses = [r["loss"] for r in rows["single"] if r["type"] == "train"]
    assert len(ddp_losses) == len(single_losses) == 4
    assert ddp_losses[0] == pytest.approx(single_losses[0], rel=1e-5)
    assert ddp_losses[1:] == pytest.approx(single_losses[1:], rel=1e-3)
    # Validation predictions were gathered from both ranks.
    results = json.loads((tmp_path / "ddp" / "results_val.json").read_text())
    assert {r["image_id"] for r in results} == {1, 2, 3, 4}
    assert sum(r["type"] == "val" for r in rows["ddp"]) == 1  # at the end (none of the budget's is due)
    # train() freed the process group it joined: no gloo thread is left to race interpreter shutdown.
    for rank in (0, 1):
        threads = json.loads((tmp_path / "ddp" / f"threads_rank{rank}.json").read_text())
        assert not [t for t in threads if "gloo" in t], threads


if __name__ == "__main__":  # a torchrun worker: config, train ann/images, val ann/images, out dir
    cfg_path, train_ann, train_images, val_ann, val_images, out_dir = sys.argv[1:]
    train(load_config(cfg_path), train_ann, train_images, val_ann, val_images, out_dir=Path(out_dir), device="cpu",
          max_iters=4, log=print)
    # The threads left for interpreter shutdown (a gloo thread there can abort the process).
    threads = sorted(Path(task).read_text().strip() for task in glob.glob("/proc/self/task/*/comm"))
    (Path(out_dir) / f"threads_rank{os.environ['RANK']}.json").write_text(json.dumps(threads))
