"""Learning: the tiny preset trained from scratch on the built-in shapes dataset learns to segment its
held-out split. A fixed number of steps (not a time budget) so that a slower machine takes longer instead
of failing. Measured here: mask AP 1.8 (AP50 5.3) after these 600 steps; a random model scores 0.0. The
project's goal of AP >= 5 within 8 minutes is not reached yet (see README, Limitations)."""

import time

import torch

from isda.config import apply_overrides, get_preset
from isda.data.shapes import make_shapes_dataset
from isda.engine import train

STEPS = 600  # batches of 8: 2.4 epochs of the 2000 training images
LR_DROP_EPOCH = 2  # x0.1 after 500 steps


def test_tiny_preset_reaches_ap_5_on_shapes(tmp_path):
    paths = make_shapes_dataset(tmp_path / "shapes")  # the default dataset: 2000 train + 200 val images
    cfg = apply_overrides(get_preset("isda_tiny"), {"train.epochs": 3, "train.lr_steps": str(LR_DROP_EPOCH),
                                                    "train.eval_every": 3})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    start = time.perf_counter()
    try:
        summary = train(cfg, *paths["train"], *paths["val"], out_dir=tmp_path / "run", max_iters=STEPS,
                        log=lambda _msg: None)
    finally:
        torch.set_num_threads(threads)
    ap = summary["val"]["AP"] * 100
    print(f"tiny preset, {STEPS} steps in {time.perf_counter() - start:.0f}s "
          f"(training {summary['train_time_s']:.0f}s): mask AP {ap:.1f}, AP50 {summary['val']['AP50'] * 100:.1f}")
    assert summary["iteration"] == STEPS
    assert ap >= 1.0
