"""Learning: the tiny preset overfits two generated images with several instances each."""

import numpy as np
import torch

import isda

from engine_utils import generated_images


def mean_best_iou(preds, targets, score_thr=0.3):
    """For each ground-truth instance: best IoU among confident predictions of the same class."""
    ious = []
    for p, t in zip(preds, targets):
        keep = p["scores"] > score_thr
        for label, mask in zip(t["labels"], t["masks"]):
            cand = p["masks"][keep & (p["labels"] == label)]
            if len(cand) == 0:
                ious.append(0.0)
                continue
            inter = (cand & mask).flatten(1).sum(1).float()
            union = (cand | mask).flatten(1).sum(1).float()
            ious.append((inter / union).max().item())
    return float(np.mean(ious))


def test_tiny_preset_overfits_generated_images():
    torch.manual_seed(0)
    images, targets = generated_images()
    assert all(len(t["labels"]) >= 3 for t in targets)
    model = isda.build_model("isda_tiny", num_classes=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    model.eval()
    with torch.no_grad():
        before = mean_best_iou(model(images), targets)
    model.train()
    steps = 100
    for _ in range(steps):
        loss = model(images, targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = mean_best_iou(model(images), targets)
    print(f"overfit: {steps} steps, mean mask IoU {before:.3f} -> {after:.3f}")
    assert after >= 0.8 and after > before + 0.3
