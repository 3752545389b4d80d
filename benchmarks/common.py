"""Shared pieces of the benchmarks: machine description, timing statistics, the two models as
benchmarked, synthetic inputs, and the textbook multi-scale deformable attention reference."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

# The paper's inference size: 800 x 1216 (short side 800; 1216 keeps a 2:3 image a multiple of 32).
INFER_SIZE = (800, 1216)
TRAIN_SIZE = (512, 512)
# 4 levels of an 800 x 1216 image at strides 8, 16, 32, 64 (Deformable DETR's P3..P6).
MSDA_SHAPES = ((100, 152), (50, 76), (25, 38), (13, 19))
# Operator classes of a torch.profiler run (self CPU time): the matrix products and convolutions (forward and
# backward), ISDA's deformable attention core (its gathers, their transposed sums and the backward's sampled
# products), and copies (dtype casts under autocast, layout changes, bias broadcasts before a GEMM).
DENSE_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::mkldnn_convolution", "aten::_slow_conv2d_forward",
             "aten::convolution_backward", "aten::_scaled_dot_product_flash_attention_for_cpu")
MSDA_GATHER_OPS = ("aten::_embedding_bag_forward_only", "aten::_embedding_bag")  # the core's forward
MSDA_CORE_OPS = (*MSDA_GATHER_OPS, "aten::sparse_sampled_addmm", "aten::sort")
COPY_OPS = ("aten::copy_",)


# ---- machine ----------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bf16_matrix_units() -> bool:
    """Whether PyTorch sees bfloat16 matrix instructions on this CPU (AMX or AVX512-BF16): recorded with the bf16
    rows, since what CPU autocast to bfloat16 gains depends on them."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def machine_info(threads: int) -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "threads": threads,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def peak_rss_gib() -> float:
    """Peak resident set of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---- statistics -------------------------------------------------------------------------------------

def summary(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples),
            "samples": [round(s, 6) for s in samples]}


def timed(fn, *args, **kwargs) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def alternate(fns: dict[str, Any], repeats: int, warmup: int = 1) -> dict[str, dict[str, Any]]:
    """Call each function ``repeats`` times, round-robin (a, b, a, b, ...), after ``warmup`` rounds;
    returns per-name timing summaries. Alternating spreads any machine noise over every side."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn)[0])
    return {name: summary(t) for name, t in times.items()}


# ---- the two models as benchmarked --------------------------------------------------------------------

def build_isda(preset: str = "isda_r50_coco", seed: int = 0, **overrides) -> nn.Module:
    import isda

    torch.manual_seed(seed)
    return isda.build_model(preset, **overrides)


MASKRCNN_INFER_KWARGS = {
    # Keep the 800 x 1216 input as is (short side 800, long side <= 1333).
    "min_size": 800, "max_size": 1333,
    # 100 detections go through the mask head, like ISDA's 100 (see limit_candidates for the threshold).
    "box_detections_per_img": 100,
}
# Random weights give every (proposal, class) pair a softmax score of about 1/91, under the default
# threshold of 0.05: no box survives and the mask head never runs. Threshold 0 instead sends all
# 1000 x 90 pairs through the per-class NMS, seconds of work a trained model never does. So the score
# threshold is set per image to keep the 1000 best pairs (a trained model keeps a few hundred to a few
# thousand above 0.05 on a busy COCO image): the standard NMS then runs on those and the best 100 go
# through the mask head.
MASKRCNN_CANDIDATES = 1000


def limit_candidates(model: nn.Module, candidates: int = MASKRCNN_CANDIDATES) -> nn.Module:
    """Wrap Mask R-CNN's ``roi_heads.postprocess_detections`` so that its score threshold keeps the
    ``candidates`` best (proposal, class) scores of each image (see MASKRCNN_CANDIDATES)."""
    heads = model.roi_heads
    original = heads.postprocess_detections

    def postprocess_detections(class_logits, box_regression, proposals, image_shapes):
        scores = F.softmax(class_logits, -1)[:, 1:]
        per_image = scores.split([len(p) for p in proposals])
        # One threshold for the batch (inference here is one image at a time): the k-th best score.
        k = min(candidates, min(s.numel() for s in per_image))
        heads.score_thresh = min(float(s.flatten().topk(k).values[-1]) for s in per_image) * (1 - 1e-6)
        return original(class_logits, box_regression, proposals, image_shapes)

    heads.postprocess_detections = postprocess_detections
    return model


def build_maskrcnn(seed: int = 0, frozen: bool = False, **kwargs) -> nn.Module:
    """torchvision Mask R-CNN R50-FPN, random init. ``frozen``: the COCO recipe's backbone (FrozenBatchNorm,
    stem + stage 1 frozen: trainable_backbone_layers=3), the same as ISDA's; otherwise
    ``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` (BatchNorm, every layer trainable)."""
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(seed)
    if not frozen:
        return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kwargs)
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
    return MaskRCNN(backbone, num_classes=91, **kwargs)


def with_isda_speedups(model: nn.Module) -> nn.Module:
    """The generic CPU speed-ups ISDA has, given to a torchvision detection model (the same effort for both sides):
    every convolution + frozen BatchNorm pair folded into one convolution (:func:`isda.models.backbone.
    fold_frozen_batchnorm`, as ISDA's backbone; a model already in eval mode has its BatchNorm layers frozen first,
    since in eval they are the same affine), and in CPU inference the normalised batch enters the backbone
    channels-last (as ``ISDA.preprocess`` does). Training keeps the default layout: ISDA measured no gain there.
    Returns the model, changed in place; call it after ``.eval()`` for inference."""
    from torchvision.ops import FrozenBatchNorm2d

    from isda.models.backbone import fold_frozen_batchnorm

    if not model.training:
        for parent in list(model.modules()):
            for name, bn in list(parent.named_children()):
                if type(bn) is nn.BatchNorm2d:
                    frozen = FrozenBatchNorm2d(bn.num_features, bn.eps).to(bn.weight)
                    frozen.load_state_dict({k: getattr(bn, k) for k in frozen.state_dict()})
                    setattr(parent, name, frozen)
    fold_frozen_batchnorm(model)

    def channels_last(module: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        if module.training or x.device.type != "cpu":
            return None
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])

    model.backbone.register_forward_pre_hook(channels_last)
    return model


# ---- inputs -------------------------------------------------------------------------------------------

def random_image(size: tuple[int, int], seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, *size, generator=g)


def shapes_batch(size: tuple[int, int], batch: int = 2, seed: int = 0, num_classes: int = 80
                 ) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Images and instance masks from the shapes generator (2-6 instances per image), labels in
    [0, num_classes). Targets also carry ``boxes`` (xyxy, from the masks) for Mask R-CNN."""
    from torchvision.ops import masks_to_boxes

    from isda.data.shapes import generate_image, image_rng

    images, targets = [], []
    for i in range(batch):
        image, instances = generate_image(image_rng(seed, "bench", i), size)
        masks = torch.from_numpy(np.stack([m for _, m in instances]))
        labels = torch.tensor([lab for lab, _ in instances], dtype=torch.int64) % num_classes
        images.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
        targets.append({"labels": labels, "masks": masks, "boxes": masks_to_boxes(masks)})
    return images, targets


# ---- textbook multi-scale deformable attention ------------------------------------------------------

def reference_ms_deform_attn(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                             attention_weights: Tensor) -> Tensor:
    """The straightforward implementation: per level, grid_sample every head's value map at that level's
    points; stack all levels; multiply by the attention weights; sum over levels and points.
    Same arguments and result as :func:`isda.ops.ms_deform_attn`."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    grids = 2 * sampling_locations - 1
    samples = []
    for lvl, (value_l, (h, w)) in enumerate(zip(value.split(sizes, dim=1), spatial_shapes.tolist())):
        # (B, h*w, M, D) -> (B*M, D, h, w)
        value_l = value_l.flatten(2).transpose(1, 2).reshape(B * M, D, int(h), int(w))
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*M, Q, P, 2)
        samples.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(samples, dim=-2).flatten(-2)  # (B*M, D, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Q, L * P)
    out = (stacked * weights).sum(-1).view(B, M * D, Q)
    return out.transpose(1, 2).contiguous()


def msda_problem(num_queries: int, shapes=MSDA_SHAPES, batch: int = 1, heads: int = 8, head_dim: int = 32,
                 points: int = 4, seed: int = 0, dtype=torch.float32, requires_grad: bool = False):
    """Random inputs at the given sizes: locations spread a little beyond [0, 1] (some samples outside),
    softmaxed weights as the module produces them."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    S = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    L = len(shapes)
    value = torch.randn(batch, S, heads, head_dim, generator=g, dtype=dtype)
    locations = torch.rand(batch, num_queries, heads, L, points, 2, generator=g, dtype=dtype) * 1.1 - 0.05
    weights = torch.randn(batch, num_queries, heads, L * points, generator=g, dtype=dtype).softmax(-1)
    weights = weights.view(batch, num_queries, heads, L, points)
    tensors = [value, locations, weights]
    if requires_grad:
        tensors = [t.requires_grad_(True) for t in tensors]
    return tensors[0], spatial_shapes, tensors[1], tensors[2]
