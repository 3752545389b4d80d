"""Shared by the engine, checkpoint and distributed tests: a CPU-sized config and a tiny shapes dataset."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from isda.config import Config, apply_overrides, get_preset
from isda.data.shapes import generate_image, make_shapes_dataset

# isda_tiny, smaller still: 64 px images, a one-layer encoder, two decoder layers, ten queries (and twenty
# training-only hybrid ones); multi-scale and crops (padded batches).
SMALL = {
    "hidden_dim": 64, "enc_layers": 1, "dec_layers": 2, "ffn_dim": 128, "num_queries": 10, "hybrid_queries": 20,
    "mask_feat_channels": 32, "mask_out_channels": 32, "num_detections": 10,
    "train_short_sides": [56, 64], "train_max_size": 64, "crop_resize_short_sides": [64, 72],
    "crop_size": [48, 64], "crop_prob": 0.5, "test_short_side": 64, "test_max_size": 64, "fit_sizes": False,
    "batch_size": 2, "num_workers": 0, "epochs": 2, "max_steps": 0, "lr_drops": [0.5], "log_every": 1,
}


def tiny_config(**overrides: Any) -> Config:
    return apply_overrides(get_preset("isda_tiny"), {**SMALL, **overrides}).validate()


def shapes(root: Path) -> dict[str, tuple[Path, Path]]:
    """8 training and 4 validation images of 64 x 64 px."""
    return make_shapes_dataset(root, num_train=8, num_val=4, image_size=64, seed=0)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """The test machine's few cores are shared: one thread is several times faster than oversubscribing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def generated_images(count: int = 2, size: int = 128, instances: tuple[int, int] = (3, 5), seed: int = 3
                     ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``count`` generated images of ``size`` px with ``instances`` (min, max) instances each, and their targets."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for _ in range(count):
        image, found = generate_image(rng, size, min_instances=instances[0], max_instances=instances[1])
        images.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
        targets.append({"labels": torch.tensor([label for label, _ in found]),
                        "masks": torch.from_numpy(np.stack([m for _, m in found]))})
    return images, targets
