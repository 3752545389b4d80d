"""What a perfect mask head could score in the representation each model predicts masks in.

Each ground-truth mask goes through that representation and back: ISDA's soft target at the mask stride (bilinear
down, as the losses see it) upsampled and thresholded as inference does; Mask R-CNN's 28 x 28 RoI target of the
mask's box (torchvision's own ``project_masks_on_boxes``) pasted back into the image (``paste_masks_in_image``) and
thresholded at 0.5. The ceiling is the mean, over COCO's IoU thresholds 0.50:0.05:0.95, of the fraction of instances
whose round trip keeps at least that IoU with the original: the mask AP of perfect detection, classes and ranking.

    python -m benchmarks.mask_ceiling runs/bench/shapes_test_200_seed1/annotations/instances_val.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from torchvision.models.detection.roi_heads import paste_masks_in_image, project_masks_on_boxes

from isda.data.rle import decode_rle
from isda.models.losses import downsample_masks

from .maskrcnn_shapes import to_maskrcnn_target

THRESHOLDS = np.linspace(0.5, 0.95, 10)


def stride_round_trip(masks: torch.Tensor, stride: int) -> torch.Tensor:
    """(N, H, W) bool -> (N, H, W) bool: the soft target at 1/stride, bilinear back up, cropped, > 0.5."""
    N, H, W = masks.shape
    small = downsample_masks(masks, (-(-H // stride), -(-W // stride)))
    up = F.interpolate(small[:, None], scale_factor=stride, mode="bilinear", align_corners=False)[:, 0, :H, :W]
    return up > 0.5


def roi_round_trip(masks: torch.Tensor, size: int = 28) -> torch.Tensor:
    """(N, H, W) bool -> (N, H, W) bool: Mask R-CNN's size x size target of each mask's box, pasted back, > 0.5."""
    if masks.shape[0] == 0:
        return masks.clone()
    boxes = to_maskrcnn_target({"labels": torch.zeros(len(masks), dtype=torch.long), "masks": masks})["boxes"]
    targets = project_masks_on_boxes(masks.float(), boxes, torch.arange(len(masks)), size)
    return paste_masks_in_image(targets[:, None], boxes, tuple(masks.shape[-2:]))[:, 0] > 0.5


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool pairs -> (N,) IoU."""
    return (a & b).flatten(1).sum(1) / (a | b).flatten(1).sum(1).clamp(min=1)


def ceiling(ious: np.ndarray) -> float:
    """Mean over the IoU thresholds of the fraction of instances at or above each (0-100)."""
    return float(100 * np.mean([(ious >= t).mean() for t in THRESHOLDS])) if len(ious) else float("nan")


REPRESENTATIONS = {"ISDA, mask stride 8": lambda m: stride_round_trip(m, 8),
                   "ISDA, mask stride 4 (the presets)": lambda m: stride_round_trip(m, 4),
                   "ISDA, mask stride 2": lambda m: stride_round_trip(m, 2),
                   "Mask R-CNN, 28 x 28 RoI masks": roi_round_trip}


def measure(ann_file: str | Path) -> dict[str, dict[str, float]]:
    """Per representation: the ceiling AP, the mean IoU and the fraction of instances at IoU >= 0.75 and >= 0.9."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_file))
    ious: dict[str, list[np.ndarray]] = {name: [] for name in REPRESENTATIONS}
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
        if not anns:
            continue
        masks = torch.from_numpy(np.stack([decode_rle(coco.annToRLE(a)) for a in anns])).bool()
        masks = masks[masks.flatten(1).any(1)]
        for name, round_trip in REPRESENTATIONS.items():
            ious[name].append(iou(round_trip(masks), masks).numpy())
    out = {}
    for name, parts in ious.items():
        v = np.concatenate(parts) if parts else np.zeros(0)
        out[name] = {"ceiling_ap": ceiling(v), "mean_iou": float(v.mean()) if len(v) else float("nan"),
                     "iou_ge_0.75": float((v >= 0.75).mean()) if len(v) else float("nan"),
                     "iou_ge_0.9": float((v >= 0.9).mean()) if len(v) else float("nan"), "instances": int(len(v))}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ann", type=Path, help="COCO instances json (polygons or RLE)")
    args = p.parse_args(argv)
    if not args.ann.is_file():
        raise SystemExit(f"error: annotation file not found: {args.ann}")
    rows = measure(args.ann)
    print("| representation | ceiling mask AP | mean IoU | IoU >= 0.75 | IoU >= 0.9 | instances |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['ceiling_ap']:.1f} | {r['mean_iou']:.3f} | {100 * r['iou_ge_0.75']:.0f} % | "
              f"{100 * r['iou_ge_0.9']:.0f} % | {r['instances']} |")


if __name__ == "__main__":
    main()
