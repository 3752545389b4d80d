"""Opt-in, training only (``model.dense_aux``), not in the paper: dense auxiliary supervision of the encoder
(Co-DETR's auxiliary heads, with CondInst's one-to-many assignment).

One-to-one matching gives the model a few positive signals per image (one query per instance). This head gives
every encoder token (all levels) class logits and a mask kernel, in the ISDA head's own form (with KP, the token's
own location as its point) applied to the same mask features; a token is positive for an instance when its centre
lies inside the instance's mask and within ``loss.dense_aux_radius`` token strides of its level from the mask's
centroid (FCOS/CondInst centre sampling), for the smaller instance when several qualify. So each instance trains
many tokens at every level, the encoder and the mask features from the first steps. Inference never runs it: the
model predicts from the decoder alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from ..config import LossConfig, ModelConfig
from .head import ISDAHead, matched_mask_logits
from .losses import _mean_over_processes, dice_loss, mask_bce_loss, mask_centroids
from .transformer import token_level_ratios


def level_sizes(shapes: list[tuple[int, int]], device: torch.device) -> Tensor:
    """Each token's level's map size (width, height) in tokens -> (S, 2), levels in order (as the memory)."""
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=device)
    return token_level_ratios(shapes, sizes[None])[0]


def assign_tokens(centers: Tensor, sizes: Tensor, padding: Tensor, masks: Tensor, radius: float) -> Tensor:
    """One image: token centres (S, 2) (x, y) in [0, 1] of the padded batch, ``sizes`` (S, 2) each token's level's
    map size (width, height in tokens, :func:`level_sizes`), padding (S,) True = padded token, instance masks
    (N, H, W) bool padded to the batch. Returns (S,) the instance each token is positive for, -1 for a negative:
    its centre's pixel is in the mask and within ``radius`` tokens of the mask centroid along both axes; of several
    such instances the smallest."""
    S, (N, H, W) = centers.shape[0], masks.shape
    if N == 0:
        return torch.full((S,), -1, dtype=torch.long, device=centers.device)
    x = (centers[:, 0] * W).long().clamp(max=W - 1)
    y = (centers[:, 1] * H).long().clamp(max=H - 1)
    inside = masks[:, y, x].T  # (S, N)
    near = ((centers[:, None] - mask_centroids(masks)[None]).abs() * sizes[:, None] < radius).all(-1)
    candidate = inside & near & ~padding[:, None]
    area = masks.flatten(1).sum(1).float()
    smallest = area.expand(S, N).masked_fill(~candidate, float("inf")).argmin(1)
    return torch.where(candidate.any(1), smallest, torch.full_like(smallest, -1))


class DenseAux(nn.Module):
    """Its own ISDA head over the encoder tokens; ``forward`` returns its losses (``loss_cls``, ``loss_dice``,
    ``loss_bce`` when ``loss.mask_bce_weight``) and their sum ``loss`` weighted as the main head's."""

    def __init__(self, cfg: ModelConfig, loss_cfg: LossConfig) -> None:
        super().__init__()
        self.loss_cfg = loss_cfg
        self.head = ISDAHead(cfg.hidden_dim, cfg.num_classes, cfg.mask_out_channels, cfg.kernel_position,
                             locality=cfg.mask_locality)

    def forward(self, out: dict[str, Tensor], targets: list[dict[str, Tensor]], padded_masks: list[Tensor],
                small_masks: list[Tensor], valid_pixels: Tensor) -> dict[str, Tensor]:
        """``out``: the model's :meth:`~isda.models.isda.ISDA.forward_features` outputs (encoder memory, token
        centres / positions / padding, mask features and their padding); padded_masks[b] (N_b, H, W) bool, padded
        to the batch; small_masks[b] (N_b, h, w) float at the mask stride; valid_pixels (B,) at that stride."""
        cfg = self.loss_cfg
        memory, padding = out["memory"], out["token_padding"]
        sizes = level_sizes([tuple(s) for s in out["spatial_shapes"].tolist()], memory.device)
        assigned = [assign_tokens(out["token_centers"], sizes, padding[b], m, cfg.dense_aux_radius)
                    for b, m in enumerate(padded_masks)]

        logits = self.head.classify(memory)  # (B, S, classes)
        target = torch.zeros_like(logits)
        for b, (t, a) in enumerate(zip(targets, assigned)):
            pos = a >= 0
            target[b, pos, t["labels"][a[pos]]] = 1.0
        num_pos = _mean_over_processes(float(sum(int((a >= 0).sum()) for a in assigned)), memory.device)
        valid = ~padding
        losses = {"loss_cls": sigmoid_focal_loss(logits[valid], target[valid], cfg.focal_alpha, cfg.focal_gamma,
                                                 reduction="sum") / num_pos}

        # Masks of at most dense_aux_max_pos positives per image, drawn at random: the mask loss's cost is bounded.
        chosen = []
        for a in assigned:
            pos = torch.nonzero(a >= 0).flatten()
            if len(pos) > cfg.dense_aux_max_pos:
                pos = pos[torch.randperm(len(pos), device=pos.device)[:cfg.dense_aux_max_pos]]
            chosen.append(pos)
        slots = max(1, *(len(c) for c in chosen))  # every image's chosen tokens in (B, slots) rows
        index = torch.zeros(len(chosen), slots, dtype=torch.long, device=memory.device)
        for b, c in enumerate(chosen):
            index[b, :len(c)] = c
        hidden = memory.gather(1, index[..., None].expand(-1, -1, memory.shape[-1]))
        points = out["token_positions"].gather(1, index[..., None].expand(-1, -1, 2))
        kernels = self.head.kernels(hidden[None], points[None], out["image_size_px"])  # (1, B, slots, K): one layer
        image = torch.cat([torch.full_like(c, b) for b, c in enumerate(chosen)])
        slot = torch.cat([torch.arange(len(c), device=c.device) for c in chosen])
        if len(image):
            pred = matched_mask_logits(kernels, out["mask_features"], out["padding_mask"], torch.zeros_like(image),
                                       image, slot).flatten(1)
            gt = torch.cat([m[a[c]] for m, a, c in zip(small_masks, assigned, chosen)]).flatten(1)
            losses["loss_dice"] = dice_loss(pred, gt, cfg.dice_form, cfg.dice_eps).mean()
            if cfg.mask_bce_weight:
                losses["loss_bce"] = mask_bce_loss(pred, gt, valid_pixels.to(pred.dtype)[image]).mean()
        else:  # no positive token in the batch: zero, with a gradient for every parameter (DistributedDataParallel)
            losses["loss_dice"] = kernels.sum() * 0
            if cfg.mask_bce_weight:
                losses["loss_bce"] = kernels.sum() * 0
        weights = {"loss_cls": cfg.class_weight, "loss_dice": cfg.dice_weight, "loss_bce": cfg.mask_bce_weight}
        losses["loss"] = sum(weights[name] * value for name, value in losses.items())
        return losses
