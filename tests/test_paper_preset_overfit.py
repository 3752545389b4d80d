"""Learning: the paper's full architecture learns. ``isda_r50_coco`` as it is (ResNet-50, 6 + 6 layers, 300 queries,
dropout 0.1, fixed reference points, the official dice loss and soft-IoU matching, the official initialisation and
recipe: AdamW 1.25e-4, backbone and sampling offsets x0.1, clipping 0.1) overfits two generated images. Only the
input size (96 px) and the step count are reduced, and the backbone trains from scratch (BatchNorm, nothing frozen:
no ImageNet weights here, and a frozen random backbone never learns)."""

import numpy as np
import torch

from engine_utils import generated_images, single_thread
from isda import ISDA
from isda.config import apply_from_scratch, get_preset
from isda.engine import param_groups
from isda.models.losses import downsample_masks
from isda.models.matcher import hungarian_match

SIZE, STEPS = 96, 60


@torch.no_grad()
def matched_mask_iou(model: ISDA, images, targets) -> float:
    """Mean over ground-truth instances of the IoU between the instance and the last decoder layer's mask of the
    query the training matcher assigns to it (eval mode: no dropout, BatchNorm running statistics), at the image's
    resolution after the model's own upsampling and 0.5 threshold."""
    model.eval()
    batch, padding = model.batch_images(images)
    out = model.forward_features(batch, padding)
    ious = []
    for b, (image, t) in enumerate(zip(images, targets)):
        size = tuple(image.shape[1:])
        mask_logits = out["mask_logits"][-1, b]
        small = downsample_masks(t["masks"], mask_logits.shape[-2:])  # SIZE is a multiple of 32: no padding
        rows, cols = hungarian_match(out["logits"][-1, b], mask_logits.flatten(1), t["labels"], small.flatten(1),
                                     model.criterion.cfg)
        pred = model.upsample_masks(mask_logits[rows].sigmoid().float(), size, size)
        gt = t["masks"][cols]
        inter = (pred & gt).flatten(1).sum(1).float()
        union = (pred | gt).flatten(1).sum(1).float().clamp(min=1)
        ious += (inter / union).tolist()
    model.train()
    return float(np.mean(ious))


def test_paper_preset_overfits_generated_images():
    torch.manual_seed(0)
    images, targets = generated_images(2, SIZE, (2, 4))
    assert sum(len(t["labels"]) for t in targets) >= 4
    cfg = apply_from_scratch(get_preset("isda_r50_coco"))
    cfg.model.num_classes = 5
    cfg.validate()
    m, loss = cfg.model, cfg.loss
    # The paper's architecture and losses, nothing else changed.
    assert (m.backbone, m.enc_layers, m.dec_layers, m.num_queries, m.dropout, m.hidden_dim) == \
        ("resnet50", 6, 6, 300, 0.1, 256)
    assert not (m.refine_points or m.query_selection or m.hybrid_queries)
    assert (loss.dice_form, loss.match_mask_cost_kind, loss.class_loss, loss.mask_bce_weight) == \
        ("official", "iou", "focal", 0.0)
    model = ISDA(cfg.model, cfg.loss)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train), lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay)
    with single_thread():  # a shared 2-core machine: one thread is faster than two contending ones
        before = matched_mask_iou(model, images, targets)
        model.train()
        for _ in range(STEPS):
            loss = model(images, targets)["loss"]
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_max_norm)
            optimizer.step()
        after = matched_mask_iou(model, images, targets)
    print(f"paper preset overfit: {STEPS} steps at {SIZE} px, mean matched-mask IoU {before:.3f} -> {after:.3f}")
    assert after >= 0.7, after
