"""Learning: the tiny preset overfits two generated images with several instances each."""

import numpy as np
import torch

import isda
from isda.data.shapes import generate_image


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


def generated_images(seed: int = 3, count: int = 2):
    """``count`` generated 128 px images with 3-5 instances each, and their targets."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for _ in range(count):
        image, instances = generate_image(rng, 128, min_instances=3, max_instances=5)
        images.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
        targets.append({"labels": torch.tensor([label for label, _ in instances]),
                        "masks": torch.from_numpy(np.stack([m for _, m in instances]))})
    return images, targets


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
