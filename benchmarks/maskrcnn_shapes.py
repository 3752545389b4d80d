"""torchvision Mask R-CNN trained from scratch on the shapes dataset, for the same-budget comparison.

The model: Mask R-CNN with a ResNet-18-FPN backbone (the tiny ISDA preset's backbone), BatchNorm
(``resnet_fpn_backbone``'s FrozenBatchNorm default would mean no normalization at all from scratch),
every layer trainable, anchors sized for the objects (16..256 px, one size per FPN level, 3 ratios).

The data: exactly what ISDA's trainer sees: the same COCO-format dataset and augmentation (the tiny
preset's data config through :func:`isda.data.build_transforms`, with the input size ``data.fit_sizes`` picks
for the training set), the same per-sample seeding
(:class:`isda.engine.SeededSamples`), batch size and number of loader workers. Mask R-CNN's own resize
is switched off (the augmentation already chose the size); it still normalizes with ImageNet statistics
and pads to a multiple of 32, as ISDA does.

The loop: AdamW or SGD + momentum (lr, weight decay, batch, step schedule and gradient clipping taken from
the ISDA preset's train config unless overridden; the benchmark's values come from a sweep on the tune split,
:mod:`benchmarks.bench_accuracy`), a linear warm-up over a fraction of the budget, a wall-clock training budget,
then COCO mask AP measured by :func:`isda.engine.evaluation.evaluate_masks`.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from isda.config import Config
from isda.data import CocoInstanceDataset, build_transforms, collate
from isda.data.sizing import dataset_stats, fit_sizes
from isda.engine import SeededSamples, adamw, lr_factor
from isda.engine.amp import autocast, check_amp_device
from isda.engine.ema import ema_model
from isda.engine.sampling import run_batches
from isda.engine.evaluation import evaluate_masks, predictions_to_coco_results

ANCHOR_SIZES = ((16,), (32,), (64,), (128,), (256,))
# RoIs sampled per image for the box/mask heads (a quarter of them positive at most). torchvision's 512 is for
# COCO's crowded images; with 2-6 objects per image 32 still keeps every object (ground-truth boxes join the
# proposals) and makes the step 3x cheaper than 128 (5.4 s vs 16.6 s at one thread, batch 8): the mask head's
# four 256-channel convolutions on every positive RoI dominate Mask R-CNN's step here.
ROI_BATCH = 32
# Linear warm-up over this share of the training budget.
WARMUP_FRAC = 0.05


def build_maskrcnn_r18(num_classes: int, min_size: int = 128, max_size: int = 192, detections: int = 100,
                       roi_batch: int = ROI_BATCH, width: int = 256) -> nn.Module:
    """Mask R-CNN R18-FPN (BatchNorm, all layers trainable, object-sized anchors) for ``num_classes``
    foreground classes; no internal resizing (inputs arrive at their training/test size). ``roi_batch``:
    RoIs sampled per image for the box/mask heads. ``width``: channels of the FPN, the RPN and the four mask-head
    convolutions, box-head MLP ``4 * width`` (256: torchvision's; smaller: sized for CPU, as ISDA tiny was)."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d,
                                   trainable_layers=5)
    heads: dict[str, nn.Module] = {}
    if width != 256:  # torchvision fixes the FPN at 256 channels: rebuild it and the heads at this width
        backbone.fpn = FeaturePyramidNetwork([64, 128, 256, 512], width, extra_blocks=LastLevelMaxPool())
        backbone.out_channels = width
        heads = {"box_head": TwoMLPHead(width * 7 * 7, 4 * width),
                 "box_predictor": FastRCNNPredictor(4 * width, num_classes + 1),
                 "mask_head": MaskRCNNHeads(width, (width,) * 4, 1),
                 "mask_predictor": MaskRCNNPredictor(width, width, num_classes + 1)}
    anchors = AnchorGenerator(sizes=ANCHOR_SIZES, aspect_ratios=((0.5, 1.0, 2.0),) * len(ANCHOR_SIZES))
    model = MaskRCNN(backbone, num_classes=None if heads else num_classes + 1, rpn_anchor_generator=anchors,
                     min_size=min_size, max_size=max_size, box_detections_per_img=detections,
                     box_batch_size_per_image=roi_batch, **heads)
    model.transform.resize = _no_resize
    return model


def _no_resize(image, target=None):
    return image, target


def to_maskrcnn_target(target: dict[str, Any]) -> dict[str, torch.Tensor]:
    """ISDA target (labels 0..C-1, bool masks) -> Mask R-CNN target (labels 1..C, uint8 masks, boxes as the
    masks' pixel extent [x0, y0, x1 + 1, y1 + 1], so that one-pixel-wide instances keep a positive size)."""
    masks = target["masks"]
    if masks.shape[0]:
        from torchvision.ops import masks_to_boxes

        boxes = masks_to_boxes(masks).float() + torch.tensor([0.0, 0.0, 1.0, 1.0])
    else:
        boxes = torch.zeros(0, 4)
    return {"labels": target["labels"] + 1, "masks": masks.to(torch.uint8), "boxes": boxes}


@torch.no_grad()
def evaluate_maskrcnn(model: nn.Module, dataset: CocoInstanceDataset, batch_size: int = 8,
                      num_workers: int = 0, amp: str = "none") -> tuple[dict[str, float], dict[str, float]]:
    """COCO mask AP (isda.engine.evaluation.evaluate_masks) of Mask R-CNN on ``dataset`` (test transforms), and the
    same class-agnostic (what wrong labels cost); ``amp`` as ISDA's evaluation (``train.amp``)."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    results = []
    for images, targets in loader:
        with autocast(torch.device("cpu"), amp):
            outputs = model(images)
        preds = []
        for out, t in zip(outputs, targets):
            masks = out["masks"][:, 0].float()
            if tuple(masks.shape[-2:]) != tuple(t["orig_size"]):
                masks = F.interpolate(masks[:, None], size=tuple(t["orig_size"]), mode="bilinear",
                                      align_corners=False)[:, 0]
            preds.append({"scores": out["scores"].float(), "labels": out["labels"] - 1, "masks": masks > 0.5,
                          "boxes": out["boxes"].float()})
        results += predictions_to_coco_results(preds, [t["image_id"] for t in targets], dataset.cat_ids)
    model.train(was_training)
    return tuple(evaluate_masks(dataset.coco, results, image_ids=dataset.ids, class_agnostic=agnostic).stats
                 for agnostic in (False, True))


def train_maskrcnn(cfg: Config, train_ann: str | Path, train_images: str | Path, val_ann: str | Path,
                   val_images: str | Path, budget_s: float, *, lr: float | None = None,
                   optimizer: str = "adamw", momentum: float = 0.9, warmup_frac: float = WARMUP_FRAC,
                   clip_max_norm: float | None = None, roi_batch: int = ROI_BATCH, detections: int | None = None,
                   width: int = 256, batch_size: int | None = None, seed: int | None = None,
                   amp: str | None = None, ema_decay: float | None = None, log=print) -> dict[str, Any]:
    """Train from scratch for ``budget_s`` seconds of training time, then evaluate (COCO mask AP).
    Hyper-parameters default to ``cfg.train``'s (the ISDA preset's): lr, weight decay, batch, workers,
    epochs / lr steps, clipping; detections per image: ISDA's ``cfg.model.num_detections``; the lr schedule follows the budget exactly as ISDA's trainer does
    (:func:`isda.engine.lr_factor` at the budget's progress), its linear warm-up over the first ``warmup_frac``
    of the budget (a fraction, not a step count: at 5-6 s a step a fixed 100 steps outlast an 8-minute run).
    ``amp``: the CPU autocast of training and evaluation, ``cfg.train.amp`` unless given (the generic speed-up
    ISDA's trainer applies, e.g. bf16 where the CPU has bfloat16 matrix units); ``ema_decay``: evaluate the weights'
    moving average (:mod:`isda.engine.ema`), ``cfg.train.ema_decay`` unless given (as ISDA's trainer)."""
    tcfg = copy.deepcopy(cfg.train)
    tcfg.time_budget_s = float(budget_s)
    tcfg.warmup_frac = warmup_frac  # ISDA's trainer's warm-up (isda.engine.schedule.warmup_factor), this fraction
    tcfg.batch_size = tcfg.batch_size if batch_size is None else batch_size
    seed = tcfg.seed if seed is None else seed
    amp = tcfg.amp if amp is None else amp
    ema_decay = tcfg.ema_decay if ema_decay is None else ema_decay
    check_amp_device(amp, torch.device("cpu"))  # ISDA's trainer's check: bf16 runs on the CPU, fp16 does not
    lr = tcfg.lr if lr is None else lr
    detections = cfg.model.num_detections if detections is None else detections
    if clip_max_norm is None:  # the preset's clipping with AdamW (which undoes most of its scale); none with SGD
        clip_max_norm = tcfg.clip_max_norm if optimizer == "adamw" else 0.0
    torch.manual_seed(seed)
    train_set = CocoInstanceDataset(train_ann, train_images, build_transforms(cfg.data, True), train=True)
    data, fitted = fit_sizes(cfg.data, dataset_stats(train_set.coco), cfg.model.num_queries)
    if fitted:  # the input sizes ISDA's trainer would choose on this data (data.fit_sizes): same pixels for both
        log(f"    {fitted}; Mask R-CNN predicts whole images at that scale (a CNN needs no windows)")
        train_set.transforms = build_transforms(data, True)
    val_set = CocoInstanceDataset(val_ann, val_images, build_transforms(data, False), train=False)
    model = build_maskrcnn_r18(train_set.num_classes, data.test_short_side, data.test_max_size,
                               detections=detections, roi_batch=roi_batch, width=width).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = adamw(params, lr, tcfg.weight_decay)  # ISDA's trainer's (fused where PyTorch has it)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=tcfg.weight_decay)
    else:
        raise ValueError(f"optimizer must be adamw or sgd, got {optimizer!r}")
    averaged = ema_model(model, ema_decay) if ema_decay > 0 else None
    samples = SeededSamples(train_set, seed)
    sampler = DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True, seed=seed)
    steps_per_epoch = math.ceil(len(sampler) / tcfg.batch_size)

    result: dict[str, Any] = {"lr": lr, "optimizer": optimizer, "clip_max_norm": clip_max_norm,
                              "warmup_frac": warmup_frac, "batch_size": tcfg.batch_size, "roi_batch": roi_batch,
                              "detections": detections, "width": width, "seed": seed, "amp": amp,
                              "ema_decay": ema_decay,
                              "input_short_side": data.test_short_side,
                              "nonfinite_steps": 0}
    step, trained = 0, 0.0
    batches = run_batches(samples, sampler, tcfg.batch_size, collate, tcfg.num_workers, seed)
    start = time.perf_counter()
    while trained < budget_s:
        images, targets = next(batches)
        progress = trained / budget_s
        factor = lr_factor(step, progress, tcfg)
        for group in opt.param_groups:
            group["lr"] = lr * factor
        with autocast(torch.device("cpu"), amp):
            losses = model(images, [to_maskrcnn_target(t) for t in targets])
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        if math.isfinite(loss.item()):
            loss.backward()
            if clip_max_norm and clip_max_norm > 0:
                nn.utils.clip_grad_norm_(params, clip_max_norm)
            opt.step()
            if averaged is not None:
                averaged.update_parameters(model)
        else:
            result["nonfinite_steps"] += 1
        step += 1
        trained = time.perf_counter() - start
        if step % 50 == 0:
            log(f"    mask r-cnn step {step} epoch {step // steps_per_epoch} loss {loss.item():.3f} ({trained:.0f} s)")
    result["train_time_s"] = trained
    result["ap"], result["ap_class_agnostic"] = evaluate_maskrcnn(model if averaged is None else averaged.module,
                                                                  val_set, tcfg.batch_size, amp=amp)
    result["iterations"] = step
    result["epochs"] = step / steps_per_epoch
    log(f"    mask r-cnn at {budget_s:.0f} s: mask AP {100 * result['ap']['AP']:.1f} ({step} steps)")
    return result
