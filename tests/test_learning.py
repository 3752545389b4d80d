"""Learning: the tiny preset trained from scratch on the built-in shapes dataset reaches mask AP >= 5
on its held-out split in fewer steps than 8 minutes of this 2-core CPU train: 500 steps of the preset's batch of 4
(one epoch of the 2000 training images), the lr dropping x0.1 at 80 % of them as a time-budgeted run's does. A
fixed number of steps, not a time budget, so that a slower machine takes longer instead of failing; a random model
scores 0.0, and the 8-minute runs of docs/benchmarks.md score several times the floor. The trained checkpoint is
then evaluated in bfloat16 as well (``--precision bf16``): its AP within 0.3 of float32's on the same split."""

import time

import torch

from isda.config import apply_overrides, get_preset
from isda.data import CocoInstanceDataset, build_transforms
from isda.data.shapes import make_shapes_dataset
from isda.engine import evaluate, train
from isda.inference import inference_precision, load_trained_model

STEPS = 500  # one epoch of the 2000 training images at the preset's batch; the lr drops at 0.8 of them


def test_tiny_preset_learns_shapes(tmp_path):
    paths = make_shapes_dataset(tmp_path / "shapes")  # the default dataset: 2000 train + 200 val images
    cfg = apply_overrides(get_preset("isda_tiny"), {"train.max_steps": STEPS, "train.evals_per_run": 1})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    start = time.perf_counter()
    try:
        summary = train(cfg, *paths["train"], *paths["val"], out_dir=tmp_path / "run",
                        log=lambda _msg: None)
    finally:
        torch.set_num_threads(threads)
    ap = summary["val"]["AP"] * 100
    print(f"tiny preset, {STEPS} steps in {time.perf_counter() - start:.0f}s "
          f"(training {summary['train_time_s']:.0f}s): mask AP {ap:.1f}, AP50 {summary['val']['AP50'] * 100:.1f}")
    assert summary["iteration"] == STEPS
    assert ap >= 5.0

    # The same checkpoint evaluated both ways on the held-out split (AP in 0-100 units).
    loaded = load_trained_model(tmp_path / "run" / "best.pt")
    val = CocoInstanceDataset(*paths["val"], build_transforms(loaded.cfg.data, train=False), train=False)
    aps = {}
    torch.set_num_threads(2)
    try:
        for precision in ("fp32", "bf16"):
            with inference_precision(loaded.model, precision):
                aps[precision] = evaluate(loaded.model, val, "cpu", batch_size=4)[0].stats["AP"] * 100
    finally:
        torch.set_num_threads(threads)
    print(f"same checkpoint: mask AP {aps['fp32']:.2f} in float32, {aps['bf16']:.2f} in bfloat16")
    assert abs(aps["bf16"] - aps["fp32"]) <= 0.3
