"""Set-prediction losses: sigmoid focal over all queries + dice on matched queries, on every decoder layer."""

from __future__ import annotations

from functools import partial
from itertools import accumulate

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

from ..config import LossConfig
from .float32 import autocast_off
from .head import matched_mask_logits, point_sample_logits, upsample_mask_logits
from .masked_ops import has_padding
from .matcher import hungarian_match, matching_cost, topk_match


def dice_loss(mask_logits: Tensor, targets: Tensor, form: str = "official", eps: float = 1e-3) -> Tensor:
    """(M, HW) logits and (M, HW) targets -> (M,) dice loss of matched pairs (``loss.dice_form``).
    official (the official code's mmdet DiceLoss): 1 - 2 sum(p t) / (sum(p^2) + sum(t^2) + 2 eps);
    laplace: 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)."""
    p = mask_logits.sigmoid()
    inter = (p * targets).sum(-1)
    if form == "official":
        return 1 - 2 * inter / ((p * p).sum(-1) + (targets * targets).sum(-1) + 2 * eps)
    if form == "laplace":
        return 1 - (2 * inter + 1) / (p.sum(-1) + targets.sum(-1) + 1)
    raise ValueError(f"config field 'loss.dice_form': must be official or laplace, got {form!r}")


def mask_bce_loss(mask_logits: Tensor, targets: Tensor, pixels: Tensor) -> Tensor:
    """(M, HW) logits and targets, (M,) each mask's image's own pixels -> (M,) binary cross-entropy per pixel of
    the image: a dense per-pixel gradient next to dice's global one. Padding (logit -1e4, target 0) adds 0 to the
    sum, so the loss does not depend on the batch's padding."""
    return F.binary_cross_entropy_with_logits(mask_logits, targets, reduction="none").sum(-1) / pixels


def varifocal_loss(logits: Tensor, quality: Tensor, alpha: float, gamma: float) -> Tensor:
    """VarifocalNet's loss, elementwise: positives (quality q > 0) binary cross-entropy towards q weighted by
    q; negatives down-weighted by (1 - alpha) * p^gamma, as the focal loss with the same alpha weighs them."""
    weight = torch.where(quality > 0, quality, (1 - alpha) * logits.sigmoid().detach().pow(gamma))
    return F.binary_cross_entropy_with_logits(logits, quality, reduction="none") * weight


def mask_iou(mask_logits: Tensor, targets: Tensor) -> Tensor:
    """(M, HW) logits and (M, HW) soft targets -> (M,) IoU of the thresholded masks (matched pairs)."""
    pred, gt = mask_logits > 0, targets > 0.5
    return (pred & gt).sum(-1) / (pred | gt).sum(-1).clamp(min=1)


def sample_mask_points(mask_logits: Tensor, padding: Tensor | None, num_points: int) -> Tensor:
    """PointRend's training points: (n, K, 2) positions (x, y) in [0, 1] of the padded map, inside each mask's
    image, for (n, h, w) mask logits and their padding (or None). Three quarters are the least certain (logit
    nearest 0) of 3K uniform candidates, where a mask's boundary is still wrong; the rest are uniform, so that
    every pixel keeps a chance (PointRend's and Mask2Former's oversampling 3 and importance ratio 0.75)."""
    n, h, w = mask_logits.shape
    extent = mask_logits.new_ones(n, 2)
    if has_padding(padding):  # padding is at the bottom and the right: the image's own columns and rows
        extent = torch.stack([(~padding[:, 0, :]).sum(-1) / w, (~padding[:, :, 0]).sum(-1) / h], -1).to(extent)
    uncertain = int(0.75 * num_points)
    candidates = torch.rand(n, 3 * num_points, 2, device=mask_logits.device) * extent[:, None]
    certainty = point_sample_logits(mask_logits.detach(), padding, candidates).abs()
    picked = candidates.gather(1, certainty.topk(uncertain, 1, largest=False).indices[..., None].expand(-1, -1, 2))
    uniform = torch.rand(n, num_points - uncertain, 2, device=mask_logits.device) * extent[:, None]
    return torch.cat([picked, uniform], 1)


def num_instances(targets: list[dict[str, Tensor]], device: torch.device) -> float:
    """Instances per process, averaged over processes when distributed (the normalizer of both losses)."""
    return _mean_over_processes(float(sum(len(t["labels"]) for t in targets)), device)


def _mean_over_processes(count: float | Tensor, device: torch.device) -> float | Tensor:
    """A count (float), or counts (a tensor), averaged over processes and at least 1."""
    n = torch.as_tensor(count, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(n.item(), 1.0) if n.dim() == 0 else n.clamp(min=1)


@autocast_off  # pixel-index sums over whole masks: beyond bfloat16's precision
def mask_centroids(masks: Tensor) -> Tensor:
    """(N, H, W) bool -> (N, 2) centre of mass (x, y) of each mask, normalized by the image size; 0 when empty."""
    N, H, W = masks.shape
    m = masks.float()
    area = m.sum((1, 2)).clamp(min=1)
    x = (m.sum(1) @ (torch.arange(W, device=m.device) + 0.5)) / area / W
    y = (m.sum(2) @ (torch.arange(H, device=m.device) + 0.5)) / area / H
    return torch.stack([x, y], -1)


def downsample_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, H, W) bool -> (N, h, w) float, bilinear (soft targets at the mask stride)."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size), dtype=torch.float32)
    return F.interpolate(masks[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


class SetCriterion:
    """The losses run in float32 under autocast (the model's outputs are cast on entry): focal and dice terms are
    logs and sums over thousands of mask pixels, which half precision rounds badly."""

    def __init__(self, cfg: LossConfig) -> None:
        self.cfg = cfg

    @autocast_off
    def __call__(self, logits: Tensor, mask_logits: Tensor, targets: list[dict[str, Tensor]],
                 target_masks: list[Tensor], valid_pixels: Tensor | None = None, points: Tensor | None = None,
                 target_points: list[Tensor] | None = None, *, kernels: Tensor | None = None,
                 mask_features: Tensor | None = None, padding_mask: Tensor | None = None,
                 matches: list[tuple[Tensor, Tensor]] | None = None, topk: int = 0,
                 fine_masks: list[Tensor] | None = None) -> dict[str, Tensor]:
        """logits (layers, B, Q, C); mask logits (layers, B, Q, h, w); target_masks[b]: (N_b, h, w) float
        at the mask stride; valid_pixels (B,): each image's un-padded pixels at that scale (default h * w);
        with point refinement, points (layers, B, Q, 2) and target_points[b] (N_b, 2) (mask centroids).
        When ``mask_logits`` carry no autograd graph, the matched queries' mask logits are computed again, with
        it, from the model's ``kernels`` (layers, B, Q, K), ``mask_features`` (B, K, h, w) and ``padding_mask``
        (B, h, w) (default: indexed from ``mask_logits``). ``matches[b]``: a fixed (query, target) assignment of
        image b for every layer (denoising queries), instead of Hungarian matching. ``topk`` (``loss.o2m_topk``):
        the layers before the last match each instance to its ``topk`` cheapest queries (:func:`topk_match`).
        ``fine_masks[b]``: image b's targets at ``loss.mask_loss_upsample`` times the mask stride's resolution, where
        the matched masks' losses are then taken (matching stays at the mask stride; required when it is > 1), on
        every pixel or on ``loss.mask_loss_points`` points per mask (the varifocal IoU then at the mask stride).
        Returns losses for the last layer (``loss_cls``, ``loss_dice``, ``loss_bce`` when ``mask_bce_weight``,
        ``loss_point`` with points), the other layers (``d0.loss_cls`` ...) and their weighted sum ``loss``."""
        up = self.cfg.mask_loss_upsample
        if up > 1 and fine_masks is None:
            raise ValueError(f"loss.mask_loss_upsample={up} needs the targets at that resolution (fine_masks)")
        logits = logits.float()
        points = points.float() if points is not None else None
        norm = num_instances(targets, logits.device)
        last = logits.shape[0] - 1
        layers = list(range(logits.shape[0])) if self.cfg.aux_loss else [last]
        cls_target = torch.zeros_like(logits[layers])
        num_points = self.cfg.mask_loss_points if up > 1 else 0
        match_layer, match_image, match_query, match_label, matched_gt, matched_points = [], [], [], [], [], []
        match_target = []  # with points: each match's row in the images' fine targets put together
        first_row = [0, *accumulate(len(m) for m in target_masks)]
        one_to_many = [bool(topk) and matches is None and layer != last for layer in layers]
        for i, layer in enumerate(layers):
            for b, (t, tm) in enumerate(zip(targets, target_masks)):
                args = (logits[layer, b], mask_logits[layer, b].flatten(1), t["labels"], tm.flatten(1), self.cfg,
                        *((points[layer, b], target_points[b]) if points is not None else ()))
                qi, ti = (matches[b] if matches is not None else topk_match(matching_cost(*args), topk)
                          if one_to_many[i] else hungarian_match(*args))
                qi, ti = qi.to(logits.device), ti.to(logits.device)
                match_label.append(t["labels"][ti])
                match_layer.append(torch.full_like(qi, i))
                match_image.append(torch.full_like(qi, b))
                match_query.append(qi)
                matched_gt.append((fine_masks[b] if up > 1 and not num_points else tm)[ti].flatten(1))
                if num_points:
                    match_target.append(ti + first_row[b])
                if points is not None:
                    matched_points.append(target_points[b][ti])
        at, image, query = torch.cat(match_layer), torch.cat(match_image), torch.cat(match_query)
        if any(one_to_many):  # those layers' losses per positive query (about topk per instance), as H-DETR's branch
            positives = _mean_over_processes(torch.bincount(at, minlength=len(layers)).float(), logits.device)
            norm = torch.where(torch.tensor(one_to_many, device=at.device), positives, norm)
        layer_index = torch.tensor(layers, device=at.device)[at]
        # One gather (or one product) for every layer and image, not one per (layer, image): a gather's backward
        # fills a zero gradient of all the mask logits, which cost more than the masks themselves.
        pred = (mask_logits[layer_index, image, query].float() if kernels is None
                else matched_mask_logits(kernels.float(), mask_features.float(), padding_mask, layer_index, image,
                                         query))
        padding = None if padding_mask is None else padding_mask[image]
        gt = torch.cat(matched_gt)
        varifocal = self.cfg.class_loss == "varifocal"
        if num_points:
            iou = mask_iou(pred.detach().flatten(1), gt) if varifocal else None
            xy = sample_mask_points(pred, padding, num_points)
            pred = point_sample_logits(pred, padding, xy)
            fine = torch.cat(fine_masks)
            rows, cols = fine.shape[-2:]
            gt = fine[torch.cat(match_target)[:, None], (xy[..., 1] * rows).long().clamp(max=rows - 1),
                      (xy[..., 0] * cols).long().clamp(max=cols - 1)].to(pred.dtype)  # the fine pixel holding it
        else:
            pred = upsample_mask_logits(pred, padding, up).flatten(1)
            iou = mask_iou(pred.detach(), gt) if varifocal else None
        cls_target[at, image, query, torch.cat(match_label)] = iou.to(cls_target.dtype) if varifocal else 1.0

        def per_layer(values: Tensor) -> Tensor:  # (matches,) -> (layers,) sums, normalized
            return values.new_zeros(len(layers)).index_add(0, at, values) / norm

        class_loss = varifocal_loss if varifocal else partial(sigmoid_focal_loss, reduction="none")
        terms = {"loss_cls": class_loss(logits[layers], cls_target, self.cfg.focal_alpha,
                                        self.cfg.focal_gamma).sum((1, 2, 3)) / norm,
                 "loss_dice": per_layer(dice_loss(pred, gt, self.cfg.dice_form, self.cfg.dice_eps))}
        if self.cfg.mask_bce_weight:
            pixels = (valid_pixels.to(pred.dtype)[image] * up * up if valid_pixels is not None and not num_points
                      else pred.new_full((pred.shape[0],), pred.shape[1]))
            terms["loss_bce"] = per_layer(mask_bce_loss(pred, gt, pixels))
        if points is not None:
            terms["loss_point"] = per_layer((points[layer_index, image, query] - torch.cat(matched_points)).abs().sum(-1))
        weights = {"loss_cls": self.cfg.class_weight, "loss_dice": self.cfg.dice_weight,
                   "loss_bce": self.cfg.mask_bce_weight, "loss_point": self.cfg.point_weight}
        losses: dict[str, Tensor] = {}
        for i, layer in enumerate(layers):
            prefix = "" if layer == last else f"d{layer}."
            losses.update({prefix + name: value[i] for name, value in terms.items()})
        losses["loss"] = sum(weights[name] * value.sum() for name, value in terms.items())
        return losses

    @autocast_off
    def encoder_loss(self, logits: Tensor, centers: Tensor, padding: Tensor, targets: list[dict[str, Tensor]],
                     masks: list[Tensor]) -> Tensor:
        """Query selection's token classifier: logits (B, S, C); token centres (S, 2) in [0, 1] of the padded
        batch; padding (B, S); masks[b] (N_b, H, W) bool, padded to the batch. A token is positive for the
        class of every instance whose mask holds its centre. Focal loss over the real tokens, normalized by
        the positive tokens (as dense detectors do)."""
        logits = logits.float()
        target = torch.zeros_like(logits)
        for b, (t, m) in enumerate(zip(targets, masks)):
            if len(t["labels"]):
                H, W = m.shape[-2:]
                x = (centers[:, 0] * W).long().clamp(max=W - 1)
                y = (centers[:, 1] * H).long().clamp(max=H - 1)
                inside = m[:, y, x].T.float()  # (S, N)
                onehot = F.one_hot(t["labels"], logits.shape[-1]).float()
                target[b] = (inside @ onehot).clamp(max=1)
        valid = ~padding
        norm = _mean_over_processes(float(target[valid].amax(-1).sum()), logits.device)
        return sigmoid_focal_loss(logits[valid], target[valid], self.cfg.focal_alpha, self.cfg.focal_gamma,
                                  reduction="sum") / norm
