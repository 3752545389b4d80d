"""Typed configuration: dataclasses, named presets, YAML round trip and ``key=value`` overrides.

Every hyper-parameter lives in exactly one field here; modules receive the dataclass they need.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .fileio import atomic_write_text, first_line


class ConfigError(ValueError):
    """A configuration value or key is invalid (the message names the field)."""


@dataclass
class ModelConfig:
    num_classes: int = 80
    # Backbone: torchvision ResNet layout so torchvision weight files load.
    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101
    backbone_norm: str = "frozen_bn"  # frozen_bn (paper, ImageNet init) | bn (from scratch)
    frozen_stages: int = 1  # 0: nothing, 1: stem + stage 1 (paper), up to 4
    backbone_weights: str | None = None  # local torchvision-format ResNet state dict
    # The backbone starts from random weights on purpose: implies backbone_norm=bn and frozen_stages=0 (a frozen,
    # FrozenBatchNorm ResNet never learns from random weights). Without it, training a frozen backbone with neither
    # backbone_weights nor --init stops with an error (require_backbone_init).
    from_scratch: bool = False
    # Deformable transformer.
    hidden_dim: int = 256
    num_heads: int = 8
    num_levels: int = 4
    num_points: int = 4
    enc_layers: int = 6
    dec_layers: int = 6
    ffn_dim: int = 1024
    dropout: float = 0.1
    num_queries: int = 300
    # Opt-in, not in the paper: reference points from the top-scoring encoder tokens (see transformer.py).
    query_selection: bool = False
    # Opt-in, training only (H-DETR hybrid matching): extra queries matched one-to-many to the ground truth
    # repeated loss.hybrid_repeats times; not built at inference, so the model stays NMS-free.
    hybrid_queries: int = 0
    # Opt-in, not in the paper: every decoder layer corrects its queries' points (Deformable DETR's iterative
    # refinement with points for boxes), supervised by the matched instance's mask centroid (loss.point_weight);
    # the next layer samples around the corrected point and KP uses it.
    refine_points: bool = False
    # Opt-in, needs refine_points (DINO's look forward twice): a point correction also learns from the next layer's loss
    look_forward_twice: bool = False
    # Opt-in, not in the paper: each query's class logits also from the mask features pooled under its own predicted
    # mask (as a RoI head classifies its box's features, at the mask stride); see ISDAHead.mask_pooled_logits.
    mask_class: bool = False
    # Not in the paper (off here, on in isda_tiny): every mask logit also gets -a * d^2, d the pixel's distance to
    # the query's point and a >= 0 predicted per query (the locality that CondInst's relative coordinates give, in
    # closed form), so that a query's mask can leave out an object of its class elsewhere in the image. The paper's
    # linear kernel sees position only through the MFR's coordinates and KP's two weights (see models/head.py).
    mask_locality: bool = False
    # Not in the paper (0: off, the paper's linear kernel): each query's kernel also carries a two-layer head with
    # this many hidden channels over the MFR (CondInst's dynamic mask head, 8 there), its logit added to the linear
    # kernel's; its output weights start at zero, so the model starts as the linear head (see models/head.py).
    mask_mlp_hidden: int = 0
    # Opt-in, training only (DN-DETR's query denoising, see models/denoising.py): this many noised copies of the
    # ground truth decoded beside the learned queries, each trained to reconstruct its instance; 0: off.
    denoising_groups: int = 0
    denoising_label_noise: float = 0.2  # probability that a copy's label is replaced by a random class
    denoising_point_noise: float = 0.4  # a copy's centroid moves by up to this x half the instance's box size
    # Opt-in: at most this many denoising queries per image, the groups of a batch cut to fit (at least one; DINO
    # caps its own at 100); 0: no cap, every image's instances times denoising_groups.
    denoising_max_queries: int = 0
    # Opt-in, needs denoising_groups (DINO's contrastive denoising): each group also holds a copy of every instance
    # moved 1-2 times as far, trained as background (a query beside an instance another query claims is rejected).
    denoising_negatives: bool = False
    # Opt-in, training only (Co-DETR-style dense auxiliary head, see models/dense_aux.py): every encoder token
    # classified and given a mask kernel, one-to-many positives near each instance's centroid; not built unless on.
    dense_aux: bool = False
    # The switches above that build nothing inference runs (each has a test that the predictions and the ONNX graph
    # are unchanged with it on): a figure of the inference network does not depend on them (benchmarks/provenance.py).
    TRAINING_ONLY: ClassVar[tuple[str, ...]] = ("hybrid_queries", "denoising_groups", "denoising_label_noise",
                                                "denoising_point_noise", "denoising_max_queries",
                                                "denoising_negatives", "dense_aux")
    # Mask feature representation (MFR) and ISDA head.
    mask_feat_channels: int = 128
    mask_out_channels: int = 256  # = dynamic kernel size (1x1 conv weights)
    mask_stride: int = 4  # 8 | 4 | 2 (paper ablation; 4 is best)
    mask_position: bool = True  # MP: coordinates concatenated to the 1/32 MFR input
    kernel_position: bool = True  # KP: reference point as the kernel's last 2 weights
    # Inference.
    num_detections: int = 100
    mask_threshold: float = 0.5
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size_divisibility: int = 32

    def validate(self) -> None:
        _check(self.backbone in ("resnet18", "resnet34", "resnet50", "resnet101"), "model.backbone",
               f"must be resnet18/34/50/101, got {self.backbone!r}")
        _check(self.backbone_norm in ("frozen_bn", "bn"), "model.backbone_norm",
               f"must be 'frozen_bn' or 'bn', got {self.backbone_norm!r}")
        _check(0 <= self.frozen_stages <= 4, "model.frozen_stages", "must be in 0..4")
        _check(not self.from_scratch or (self.backbone_norm == "bn" and self.frozen_stages == 0),
               "model.from_scratch", "needs model.backbone_norm=bn and model.frozen_stages=0 "
               "(isda train --from-scratch sets all three)")
        _check(not (self.from_scratch and self.backbone_weights), "model.from_scratch",
               "contradicts model.backbone_weights: drop one")
        _check(self.mask_stride in (2, 4, 8), "model.mask_stride", f"must be 8, 4 or 2, got {self.mask_stride}")
        _check(self.num_classes >= 1, "model.num_classes", "must be >= 1")
        _check(self.hidden_dim % self.num_heads == 0, "model.hidden_dim", "must be divisible by num_heads")
        _check(self.hidden_dim % 2 == 0, "model.hidden_dim", "must be even (sine encoding)")
        _check(self.num_levels == 4, "model.num_levels", "ISDA uses the 4 maps P3..P6")
        _check(self.num_queries >= 1, "model.num_queries", "must be >= 1")
        _check(self.hybrid_queries >= 0, "model.hybrid_queries", "must be >= 0")
        _check(not self.look_forward_twice or self.refine_points, "model.look_forward_twice",
               "needs model.refine_points=true (it changes how the refined points are learned)")
        _check(self.denoising_groups >= 0, "model.denoising_groups", "must be >= 0 (0: off)")
        _check(0 <= self.denoising_label_noise <= 1, "model.denoising_label_noise", "must be a probability in [0, 1]")
        _check(self.denoising_point_noise >= 0, "model.denoising_point_noise", "must be >= 0")
        _check(self.denoising_max_queries >= 0, "model.denoising_max_queries", "must be >= 0 (0: no cap)")
        _check(not self.denoising_negatives or self.denoising_groups > 0, "model.denoising_negatives",
               "needs model.denoising_groups > 0 (the negative copies live in the denoising groups)")
        _check(self.num_detections >= 1, "model.num_detections", "must be >= 1")
        _check(self.mask_out_channels > 2, "model.mask_out_channels", "must be > 2")
        _check(self.mask_mlp_hidden >= 0, "model.mask_mlp_hidden", "must be >= 0 (0: the paper's linear kernel)")
        _check(self.hidden_dim % 32 == 0 and self.mask_feat_channels % 32 == 0, "model.hidden_dim",
               "hidden_dim and mask_feat_channels must be multiples of 32 (GroupNorm(32))")


@dataclass
class LossConfig:
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # focal (paper): matched query's class target 1. varifocal (opt-in, VarifocalNet): target = the IoU of its
    # predicted mask with the ground truth, so that scores rank masks by quality.
    class_loss: str = "focal"
    class_weight: float = 2.0
    dice_weight: float = 3.0
    # Dice loss on matched masks. official (the official code's mmdet DiceLoss, naive_dice=False):
    # 1 - 2 sum(p t) / (sum(p^2) + sum(t^2) + 2 dice_eps). laplace: 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1).
    dice_form: str = "official"
    dice_eps: float = 1e-3
    mask_bce_weight: float = 0.0  # opt-in, not in the paper: + binary cross-entropy on matched masks
    # Opt-in, not in the paper (PointRend / Mask2Former take their mask losses at a finer resolution than the
    # logits): the matched masks' losses on the logits upsampled bilinearly by this factor, against targets at
    # that resolution, as inference upsamples them; 1: at the mask stride (official).
    mask_loss_upsample: int = 1
    # Opt-in, with mask_loss_upsample > 1 (PointRend's training points, as Mask2Former takes its mask losses): the
    # matched masks' dice and BCE on this many points per mask instead of every finer pixel, 3/4 of them where the
    # logits are least certain, so that a step costs what it costs at the mask stride; 0: every pixel.
    mask_loss_points: int = 0
    point_weight: float = 5.0  # L1 to the mask centroid in loss and matching, with model.refine_points (DETR's box L1)
    match_class_cost: float = 2.0
    match_mask_cost: float = 3.0
    # Matching's mask cost on the sigmoid masks. iou (official MaskIoUCost, soft IoU):
    # 1 - sum(p t) / (sum(p) + sum(t) - sum(p t)); dice: 1 - the laplace dice above.
    match_mask_cost_kind: str = "iou"
    # Opt-in (Stable-DINO's position-modulated cost): matching class cost on p^(1-a) * soft mask IoU^a, a = this; 0: off
    match_quality: float = 0.0
    # Opt-in (MS-DETR / Align-DETR): decoder layers before the last match each instance to k cheapest queries; 0: off
    o2m_topk: int = 0
    aux_loss: bool = True  # same losses on every decoder layer (deep supervision)
    hybrid_repeats: int = 6  # one-to-many branch: each ground-truth instance repeated this many times
    hybrid_weight: float = 1.0  # weight of the one-to-many branch's losses
    denoising_weight: float = 1.0  # weight of the denoising queries' losses (model.denoising_groups)
    dense_aux_weight: float = 1.0  # weight of the dense auxiliary head's losses (model.dense_aux)
    dense_aux_max_pos: int = 64  # dense auxiliary head: mask loss on at most this many positive tokens per image
    dense_aux_radius: float = 1.5  # dense auxiliary head: positives within this many token strides of the centroid


@dataclass
class DataConfig:
    # Official policy: flip, then 50/50 multi-scale resize or resize -> random crop -> multi-scale.
    train_short_sides: tuple[int, ...] = tuple(range(480, 801, 32))
    train_max_size: int = 1333
    crop_resize_short_sides: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, int] = (384, 600)  # random crop side range
    crop_prob: float = 0.5
    flip_prob: float = 0.5
    test_short_side: int = 800
    test_max_size: int = 1333
    # Test images larger than this many px (at the test size) are predicted window by window of this size,
    # overlapping by half (isda.tiling.predict_in_windows), as a model trained on crops of it saw its inputs; 0: whole.
    # Set by fit_sizes: the model's coordinates are relative to its input, so a larger one means other things to it.
    test_window: int = 0
    # Not in the paper (off here, on in isda_tiny): when the training set's median instance would be smaller than
    # fit_instance_px after the test resize, scale the input up until it is not, train on crops of the training size
    # at that scale (same cost per step) and predict in windows of that size (test_window). See isda/data/sizing.py.
    fit_sizes: bool = False
    fit_instance_px: float = 24.0  # the shapes dataset's median instance at 128 px, where isda_tiny was tuned


@dataclass
class TrainConfig:
    lr: float = 1.25e-4  # for a total batch of 8 (8 GPUs x 1 image)
    weight_decay: float = 1e-4
    lr_backbone_mult: float = 0.1
    lr_linear_proj_mult: float = 0.1  # sampling offsets and reference-point projection
    clip_max_norm: float = 0.1
    # The run's length: time_budget_s if > 0, else max_steps if > 0, else epochs (see engine/schedule.py).
    epochs: int = 42
    max_steps: int = 0  # optimizer steps (detectron2's MAX_ITER); 0: use epochs
    # Fractions of the run where lr *= lr_gamma; the official recipe drops at epochs 27, 33, 35, 36, 37 of 42.
    lr_drops: tuple[float, ...] = tuple(e / 42 for e in (27, 33, 35, 36, 37))
    lr_gamma: float = 0.1
    warmup_iters: int = 0
    # Linear warm-up over this fraction of the run (a time budget's as well, where a step count cannot say how
    # much of it that is): from 1 % of the lr. 0: none (the official recipe).
    warmup_frac: float = 0.0
    batch_size: int = 1  # per process
    accumulate: int = 1
    amp: str = "none"  # none | bf16 (CUDA or CPU) | fp16 (CUDA only); inference: PRECISIONS
    num_workers: int = 2
    seed: int = 42
    checkpoint_every: int = 0  # iterations; 0: only at validations (and every epoch in a run measured in epochs)
    eval_every: int = 1  # epochs, in a run measured in epochs
    # Validations in a run measured in steps or time (at 1/n, 2/n, ..., 1 of it): epochs are not a useful
    # clock there (a 3-image dataset has one step per epoch).
    evals_per_run: int = 5
    log_every: int = 20  # iterations between "train" rows of metrics.jsonl
    max_nonfinite: int = 10  # consecutive non-finite losses before stopping
    # > 0: validate, save and export the weights' exponential moving average (engine/ema.py; its decay ramps up
    # from the first steps); 0: the trained weights themselves (the official recipe).
    ema_decay: float = 0.0
    # Training seconds (validation excluded) the run lasts: a target the lr schedule follows, not only a cap.
    time_budget_s: float = 0.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        self.model.validate()
        _check(self.train.amp in ("none", "bf16", "fp16"), "train.amp", "must be none, bf16 or fp16")
        _check(self.train.batch_size >= 1, "train.batch_size", "must be >= 1")
        # AdamW takes inf (then every weight becomes inf/NaN after one step) and raises a traceback on NaN or < 0.
        _check(math.isfinite(self.train.lr) and self.train.lr > 0, "train.lr",
               f"must be a finite number > 0, got {self.train.lr}")
        _check(0 <= self.train.warmup_frac < 1, "train.warmup_frac",
               f"must be in [0, 1) (0: off), got {self.train.warmup_frac}")
        _check(0 <= self.train.ema_decay < 1, "train.ema_decay", f"must be in [0, 1) (0: off), got {self.train.ema_decay}")
        for name in ("lr_backbone_mult", "lr_linear_proj_mult", "weight_decay"):
            value = getattr(self.train, name)
            _check(math.isfinite(value) and value >= 0, f"train.{name}", f"must be a finite number >= 0, got {value}")
        _check(self.loss.class_loss in ("focal", "varifocal"), "loss.class_loss", "must be focal or varifocal")
        _check(self.loss.dice_form in ("official", "laplace"), "loss.dice_form",
               f"must be official or laplace, got {self.loss.dice_form!r}")
        _check(self.loss.dice_eps > 0, "loss.dice_eps", f"must be > 0, got {self.loss.dice_eps}")
        _check(self.loss.match_mask_cost_kind in ("iou", "dice"), "loss.match_mask_cost_kind",
               f"must be iou or dice, got {self.loss.match_mask_cost_kind!r}")
        _check(0 <= self.loss.match_quality < 1, "loss.match_quality",
               f"must be in [0, 1) (0: off), got {self.loss.match_quality}")
        _check(self.loss.o2m_topk >= 0, "loss.o2m_topk", f"must be >= 0 (0: off), got {self.loss.o2m_topk}")
        _check(not self.loss.o2m_topk or self.loss.aux_loss, "loss.o2m_topk",
               "needs loss.aux_loss=true (it supervises the decoder layers before the last)")
        up = self.loss.mask_loss_upsample
        _check(isinstance(up, int) and up >= 1 and self.model.mask_stride % up == 0, "loss.mask_loss_upsample",
               f"must be an integer >= 1 that divides model.mask_stride ({self.model.mask_stride}), got {up!r}")
        points = self.loss.mask_loss_points
        _check(isinstance(points, int) and points >= 0, "loss.mask_loss_points",
               f"must be an integer >= 0 (0: every pixel), got {points!r}")
        _check(not points or up > 1, "loss.mask_loss_points",
               "needs loss.mask_loss_upsample > 1 (the points are taken at that resolution)")
        _check(self.loss.hybrid_repeats >= 1, "loss.hybrid_repeats", "must be >= 1")
        _check(self.loss.dense_aux_weight >= 0, "loss.dense_aux_weight", "must be >= 0")
        _check(self.loss.dense_aux_max_pos >= 1, "loss.dense_aux_max_pos", "must be >= 1")
        _check(self.loss.dense_aux_radius > 0, "loss.dense_aux_radius", "must be > 0")
        _check(self.train.accumulate >= 1, "train.accumulate", "must be >= 1")
        _check(self.train.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.train.eval_every >= 1, "train.eval_every", "must be >= 1")
        _check(self.train.evals_per_run >= 1, "train.evals_per_run", "must be >= 1")
        _check(self.train.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.train.max_steps >= 0, "train.max_steps", "must be >= 0 (0: use train.epochs)")
        _check(math.isfinite(self.train.time_budget_s) and self.train.time_budget_s >= 0, "train.time_budget_s",
               "must be a finite number >= 0 (0: no budget)")
        _check(all(0 <= f <= 1 for f in self.train.lr_drops), "train.lr_drops",
               f"must be fractions of the run in [0, 1], got {list(self.train.lr_drops)}")
        _check(len(self.data.train_short_sides) > 0, "data.train_short_sides", "must not be empty")
        _check(self.data.test_window == 0 or self.data.test_window >= 32, "data.test_window",
               f"must be 0 (whole images) or at least 32 px, got {self.data.test_window}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config field '{name}': {message}")


def apply_from_scratch(cfg: Config) -> Config:
    """Train the backbone from random weights: BatchNorm with batch statistics, nothing frozen, and the config
    says so (``model.from_scratch``). What ``isda train --from-scratch`` does."""
    cfg.model.from_scratch, cfg.model.backbone_norm, cfg.model.frozen_stages = True, "bn", 0
    return cfg


def require_backbone_init(cfg: Config, init: str | os.PathLike | None) -> None:
    """A frozen backbone (FrozenBatchNorm or frozen stages) with random weights never learns: training one stops
    here unless weights are given (``init`` or ``model.backbone_weights``) or ``model.from_scratch`` is set."""
    m = cfg.model
    if init is None and not m.backbone_weights and not m.from_scratch and (
            m.backbone_norm == "frozen_bn" or m.frozen_stages > 0):
        raise ConfigError(
            f"config field 'model.backbone_weights': the {m.backbone} backbone is frozen (backbone_norm="
            f"{m.backbone_norm}, frozen_stages={m.frozen_stages}) and has no weights, so it would never learn: pass "
            f"--init CKPT (a Deformable-DETR checkpoint converted with `isda convert`), or --set "
            f"model.backbone_weights=FILE (a torchvision {m.backbone} state dict, e.g. resnet50-0676ba61.pth), or "
            f"--from-scratch (BatchNorm, nothing frozen)")


def isda_r50_coco() -> Config:
    """The paper's configuration (official isda_r50_3x_coco): every default above."""
    return Config()


def isda_tiny() -> Config:
    """Same code, small enough to train from scratch on 2 CPU cores in minutes (shapes dataset)."""
    return Config(
        model=ModelConfig(
            num_classes=5,
            backbone="resnet18",
            backbone_norm="bn",
            frozen_stages=0,
            hidden_dim=128,
            num_heads=8,
            enc_layers=2,
            dec_layers=3,
            ffn_dim=512,
            dropout=0.0,
            num_queries=50,  # chosen on the tune split, no loss on the held-out family (docs/convergence.md)
            mask_feat_channels=64,
            mask_out_channels=64,
            # Mask features at stride 2 (the paper's ablation found 4 best on COCO): chosen on the tune split, a gain
            # on the held-out family too (docs/convergence.md, 8 minutes, two seeds, bf16), in fewer steps per minute.
            mask_stride=2,
            num_detections=50,
            refine_points=True,  # not the paper's architecture (off in isda_r50_coco): see refine_points above
            # Not the paper's head either (see mask_locality above): chosen on the tune split (docs/convergence.md,
            # 8 minutes, two seeds, bf16), no loss on the held-out family; touching objects of one class need it.
            mask_locality=True,
            # Training only (DN-DETR's query denoising, see denoising_groups above): chosen on the tune split over
            # query selection (docs/convergence.md, 8 minutes, two seeds, bf16), no loss on the held-out family;
            # inference and the exported graph are unchanged by it.
            denoising_groups=5,
        ),
        # Measured on the shapes dataset (docs/convergence.md), AP after 250 steps: + mask BCE 1.1 -> 2.3;
        # + varifocal class loss (scores rank masks by IoU) 2.3 -> 3.7; + point refinement 3.7 -> 6.5.
        # The official dice loss and soft-IoU matching cost as the paper preset: on the shapes dataset (250 / 500 steps,
        # docs/convergence.md) AP 7.2 / 19.0 against 8.3 / 19.3 with the Laplace dice and dice cost (loss.dice_form=laplace,
        # loss.match_mask_cost_kind=dice): no measurable difference, so one form for both presets.
        # One-to-many matching on the decoder layers before the last (loss.o2m_topk=3): chosen on the tune split
        # (docs/benchmarks.md, "How isda_tiny chose its defaults": 8 minutes, two seeds) over denoising, quality
        # matching, look-forward-twice and the dense auxiliary head; inference is unchanged by it.
        loss=LossConfig(mask_bce_weight=3.0, class_loss="varifocal", o2m_topk=3),
        # Flip and one 128 px scale, no crop: no batch padding (the crop's resize made 128-192 px batches),
        # the cheapest step on a CPU.
        data=DataConfig(
            train_short_sides=(128,),
            train_max_size=192,
            crop_prob=0.0,
            test_short_side=128,
            test_max_size=192,
            # Small objects get the input size they need, trained on crops and predicted in windows of them (see
            # fit_sizes above): chosen on the held-out family (docs/benchmarks.md: a tie with the fixed size there,
            # nothing changes on the shapes dataset, whose objects already keep fit_instance_px); real nuclei need it.
            fit_sizes=True,
        ),
        # From scratch the backbone learns at the full lr (the paper's x0.1 protects ImageNet weights). Batch 4: the
        # tune sweep's best (docs/benchmarks.md), more steps in the same minutes than batch 8. lr 8e-4 after a linear
        # warm-up over the first 5 % of the run (the Mask R-CNN baseline's): chosen on the tune split over lr 4e-4,
        # 6e-4 and 1e-3 with and without it (docs/convergence.md, 8 minutes, two seeds, bf16), a gain on the
        # held-out family too. Measured in steps, not epochs, so that its length does not depend on the dataset's
        # size: 15,000 steps are the 30 epochs of the 2,000-image shapes dataset it was tuned on.
        train=TrainConfig(lr=8e-4, warmup_frac=0.05, lr_backbone_mult=1.0, max_steps=15000, lr_drops=(0.8,),
                          batch_size=4, clip_max_norm=0.1, num_workers=1),
    )


PRESETS = {"isda_r50_coco": isda_r50_coco, "isda_tiny": isda_tiny}

# Inference precisions (isda.inference.inference_precision, isda eval/predict --precision): not a field of the
# config, since the same trained model runs in either.
PRECISIONS = ("fp32", "bf16")


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def _coerce(value: Any, template: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the type of the field's current value."""
    if isinstance(template, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config field '{name}': expected true/false, got {value!r}")
    if isinstance(template, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value if value.strip().startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{name}': expected a list, got {value!r}")
        inner = template[0] if template else value[0] if value else 0
        return tuple(_coerce(v, inner, name) for v in value)
    if isinstance(template, (int, float)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config field '{name}': expected a number, got {value!r}") from None
        if isinstance(template, int):
            if not number.is_integer():
                raise ConfigError(f"config field '{name}': expected an integer, got {value!r}")
            return int(number)
        return number
    if template is None or isinstance(template, str):
        if value in (None, "null", "None", ""):
            return None
        return str(value)
    return value


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Set dotted keys (``train.lr``) or unique leaf names (``lr``) on a config; unknown keys raise."""
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        if "." in key:
            section_name, _, leaf = key.partition(".")
            if section_name not in sections:
                raise ConfigError(f"unknown config key '{key}' (sections: {', '.join(sections)})")
            section = sections[section_name]
        else:
            owners = [s for s in sections.values() if key in leaf_names(s)]
            if len(owners) != 1:
                raise ConfigError(f"unknown config key '{key}'" if not owners else
                                  f"ambiguous config key '{key}': prefix it with its section")
            section, leaf = owners[0], key
        if leaf not in leaf_names(section):
            raise ConfigError(f"unknown config key '{key}'")
        setattr(section, leaf, _coerce(value, getattr(section, leaf), key))
    return cfg


def leaf_names(section: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(section)}


def from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Build a config from a nested dict (e.g. a YAML file); unknown keys raise ConfigError."""
    cfg = base if base is not None else Config()
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping of sections (model, loss, data, train)")
    flat = {}
    for section, values in data.items():
        if section == "preset":
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping")
        flat.update({f"{section}.{k}": v for k, v in values.items()})
    if "train.lr_steps" in flat:  # configs and checkpoints before lr_drops: milestones in epochs
        epochs = float(flat.get("train.epochs", cfg.train.epochs))
        flat["train.lr_drops"] = [float(e) / epochs for e in flat.pop("train.lr_steps")]
    return apply_overrides(cfg, flat)


def load_config(path: str | os.PathLike) -> Config:
    """Load a YAML config; an optional top-level ``preset:`` names the base preset."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({first_line(e)})") from None
    base = get_preset(data["preset"]) if isinstance(data, dict) and "preset" in data else None
    return from_dict(data, base).validate()


def config_yaml(cfg: Config) -> str:
    """The config as the YAML text ``load_config`` reads back."""
    return yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    atomic_write_text(path, config_yaml(cfg))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
