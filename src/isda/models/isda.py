"""ISDA: backbone -> neck -> deformable transformer + mask features -> ISDA head; NMS-free inference."""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, ConfigError, LossConfig, ModelConfig, apply_overrides, get_preset
from .backbone import Backbone
from .denoising import Denoising, DenoisingQueries
from .dense_aux import DenseAux
from .head import LOCALITY_UNIT_PX, ISDAHead, apply_kernels, apply_kernels_float32, mask_padding
from .losses import SetCriterion, downsample_masks, mask_centroids
from .masked_ops import exporting, resize_mask
from .mask_features import MaskFeatures, locality_channels
from .neck import Neck
from .position_encoding import sine_position_encoding
from .transformer import DeformableTransformer


class ISDA(nn.Module):
    """``model(images, targets)`` -> dict of losses (train); ``model(images)`` -> list of per-image dicts
    with ``scores``, ``labels``, ``masks`` (bool, the image's own size), ``boxes`` (xyxy, from the masks),
    ``query_index`` and ``reference_points`` (the detection's query and its (x, y) in [0, 1]) (eval)."""

    def __init__(self, cfg: ModelConfig, loss_cfg: LossConfig | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.neck = Neck(self.backbone.out_channels, cfg.hidden_dim)
        self.transformer = DeformableTransformer(cfg)
        self.mask_features = MaskFeatures(cfg.hidden_dim, cfg.mask_feat_channels, cfg.mask_out_channels,
                                          cfg.mask_stride, cfg.mask_position)
        self.head = ISDAHead(cfg.hidden_dim, cfg.num_classes, cfg.mask_out_channels, cfg.kernel_position,
                             mask_class=cfg.mask_class, locality=cfg.mask_locality,
                             mlp_hidden=cfg.mask_mlp_hidden)
        self.denoising = (Denoising(cfg.hidden_dim, cfg.num_classes, cfg.denoising_groups, cfg.denoising_label_noise,
                                    cfg.denoising_point_noise, cfg.denoising_max_queries,
                                    cfg.denoising_negatives)
                          if cfg.denoising_groups else None)
        self.criterion = SetCriterion(loss_cfg or LossConfig())
        self.dense_aux = DenseAux(cfg, self.criterion.cfg) if cfg.dense_aux else None
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(3, 1, 1), persistent=False)

    # ---- input handling -------------------------------------------------------------------------
    def batch_images(self, images: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Normalize, then zero-pad to a common size divisible by 32. Returns (B,3,H,W), mask (B,H,W) True=pad.
        In CPU inference the batch is channels-last: oneDNN's convolutions run faster in that layout (and keep
        it); training measured no faster with it, so it keeps the default layout."""
        _check_images(images)
        div = self.cfg.size_divisibility
        H = -(-max(im.shape[1] for im in images) // div) * div
        W = -(-max(im.shape[2] for im in images) // div) * div
        batch = images[0].new_zeros(len(images), 3, H, W)
        mask = torch.ones(len(images), H, W, dtype=torch.bool, device=images[0].device)
        for i, im in enumerate(images):
            h, w = im.shape[1:]
            batch[i, :, :h, :w] = (im - self.pixel_mean) / self.pixel_std
            mask[i, :h, :w] = False
        if batch.device.type == "cpu" and not self.training:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch, mask

    # ---- network -----------------------------------------------------------------------------
    def forward_features(self, batch: Tensor, mask: Tensor, denoising: DenoisingQueries | None = None
                         ) -> dict[str, Tensor]:
        """Everything up to the head's outputs for a padded, normalized batch (mask logits of every
        decoder layer in training, of the last one in eval); ``denoising`` queries are decoded after the learned
        ones and returned as ``out["denoising"]``. In training the mask logits carry no autograd
        graph: the losses compute the matched queries' masks again, with it, from ``kernels`` and
        ``mask_features`` (:func:`isda.models.head.matched_mask_logits`)."""
        feats, masks = self.neck(self.backbone(batch), mask)  # P2..P6
        pos = [sine_position_encoding(m, self.cfg.hidden_dim // 2).to(f.dtype) for f, m in zip(feats[1:], masks[1:])]
        out = self.transformer(feats[1:], masks[1:], pos, denoising)
        out["denoising"] = denoising
        stride = self.cfg.mask_stride
        mfr_mask = resize_mask(mask, (batch.shape[-2] // stride, batch.shape[-1] // stride))
        mfr = self.mask_features(feats[:4], masks[:4], mfr_mask)
        out["image_size_px"] = None
        if self.cfg.mask_locality:  # the channels its kernels' four locality weights read (in float32, as the
            # product: apply_kernels_float32), in the points' frame (each image's own size in pixels)
            out["image_size_px"] = torch.stack([(~mask[:, 0, :]).sum(1), (~mask[:, :, 0]).sum(1)], -1).float()
            mfr = torch.cat([mfr.float(), locality_channels(mfr_mask, stride, LOCALITY_UNIT_PX)], 1)
        out["logits"] = self.head.classify(out["hidden"])
        # Deep supervision needs every layer's masks; inference only the last layer's.
        layers = slice(None) if self.training else slice(-1, None)
        out["kernels"], out["mask_features"], out["padding_mask"] = (
            self.head.kernels(out["hidden"][layers], out["points"][layers], out["image_size_px"]), mfr, mfr_mask)
        # The mask losses see matched queries only, so in training every query's masks (for the matcher) are
        # computed without autograd and the losses compute the matched ones again with it: the backward of the
        # full product was two GEMMs over (layers x batch x queries) rows of zero gradient.
        with torch.no_grad() if self.training else contextlib.nullcontext():
            product = apply_kernels_float32 if self.cfg.mask_locality else apply_kernels
            out["mask_logits"] = mask_padding(product(out["kernels"], mfr), mfr_mask[None, :, None])
        if self.head.mask_class is not None:
            out["logits"] = self.head.mask_pooled_logits(out["logits"], out["mask_logits"], mfr)
        return out

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None,
                output_sizes: list[tuple[int, int]] | None = None):
        batch, mask = self.batch_images(images)
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets (call model.eval() for inference)")
            _check_targets(images, targets, self.cfg.num_classes)
        denoising = centroids = None
        if self.training and (self.denoising is not None or self.cfg.refine_points):
            centroids = [mask_centroids(t["masks"]) for t in targets]  # denoising's and point refinement's targets
        if self.training and self.denoising is not None:
            denoising = self.denoising(targets, centroids)
        out = self.forward_features(batch, mask, denoising)
        if self.training:
            return self.losses(out, targets, batch.shape[-2:], centroids)
        sizes = [tuple(im.shape[1:]) for im in images]
        return self.postprocess(out, sizes, output_sizes or sizes)

    def losses(self, out: dict[str, Tensor], targets: list[dict[str, Tensor]], padded_size: tuple[int, int],
               centroids: list[Tensor] | None = None) -> dict[str, Tensor]:
        """The training losses of :meth:`forward_features`' outputs for a batch padded to ``padded_size`` (H, W):
        the set criterion on the one-to-one queries, on the one-to-many ones (``hybrid_queries``), on the
        denoising ones (fixed assignment), the encoder's token classifier (query selection) and the dense auxiliary
        head on the encoder's tokens (``model.dense_aux``)."""
        size = out["mask_logits"].shape[-2:]
        padded = [_pad_masks(t["masks"], padded_size) for t in targets]
        small = [downsample_masks(m, size) for m in padded]
        up = self.criterion.cfg.mask_loss_upsample  # the matched masks' losses at a finer resolution (opt-in)
        fine = [downsample_masks(m, (size[0] * up, size[1] * up)) for m in padded] if up > 1 else None
        valid = (~out["padding_mask"]).flatten(1).sum(1)
        # Point refinement's supervision: each query's points against its instance's mask centroid.
        points = out["points"] if self.cfg.refine_points else None
        if points is not None and centroids is None:  # the targets' mask centroids, unless the caller has them
            centroids = [mask_centroids(t["masks"]) for t in targets]
        # Without autograd in the mask logits, the criterion computes the matched masks from the kernels.
        kernels = None if out["mask_logits"].requires_grad else out["kernels"]
        masks = {"mask_features": out["mask_features"], "padding_mask": out["padding_mask"]}

        def criterion(queries: slice, repeats: int = 1, matches: list[tuple[Tensor, Tensor]] | None = None,
                      topk: int = 0) -> dict[str, Tensor]:
            """The criterion on a slice of the queries, against every instance repeated ``repeats`` times."""
            return self.criterion(
                out["logits"][:, :, queries], out["mask_logits"][:, :, queries],
                [{"labels": t["labels"].repeat(repeats)} for t in targets], [m.repeat(repeats, 1, 1) for m in small],
                valid, None if points is None else points[:, :, queries],
                None if points is None else [c.repeat(repeats, 1) for c in centroids],
                kernels=None if kernels is None else kernels[:, :, queries], matches=matches, topk=topk,
                fine_masks=None if fine is None else [m.repeat(repeats, 1, 1) for m in fine], **masks)

        Q, H = self.cfg.num_queries, self.cfg.hybrid_queries
        losses = criterion(slice(0, Q), topk=self.criterion.cfg.o2m_topk)  # (one-to-many on the earlier layers)
        branches = []
        if H:
            branches.append(("h.", self.criterion.cfg.hybrid_weight,
                             criterion(slice(Q, Q + H), self.criterion.cfg.hybrid_repeats)))
        if out["denoising"] is not None:
            dn = out["denoising"]
            branches.append(("dn.", self.criterion.cfg.denoising_weight,
                             criterion(slice(Q + H, None), dn.groups, dn.matches([len(t["labels"]) for t in targets]))))
        if self.dense_aux is not None:
            branches.append(("dense.", self.criterion.cfg.dense_aux_weight,
                             self.dense_aux(out, targets, padded, small, valid)))
        for prefix, weight, branch in branches:
            losses["loss"] = losses["loss"] + weight * branch.pop("loss")
            losses.update({prefix + name: value for name, value in branch.items()})
        if "enc_logits" in out:
            losses["enc.loss_cls"] = self.criterion.encoder_loss(
                out["enc_logits"], out["token_centers"], out["token_padding"], targets, padded)
            losses["loss"] = losses["loss"] + self.criterion.cfg.class_weight * losses["enc.loss_cls"]
        return losses

    # ---- NMS-free post-processing ----------------------------------------------------------------
    @torch.no_grad()
    def postprocess(self, out: dict[str, Tensor], image_sizes: list[tuple[int, int]],
                    output_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Top-k (query, class) pairs by sigmoid score; score x maskness; masks upsampled to the mask
        stride's input size, cropped to the image, resized to ``output_sizes``, thresholded."""
        logits, mask_logits = out["logits"][-1], out["mask_logits"][-1]
        B, Q, C = logits.shape
        k = min(self.cfg.num_detections, Q * C)
        results = []
        for b in range(B):
            scores, labels, query, probs = rank_detections(logits[b], mask_logits[b], k, self.cfg.mask_threshold)
            masks = self.upsample_masks(probs, image_sizes[b], output_sizes[b])
            results.append({"scores": scores, "labels": labels, "masks": masks, "boxes": mask_boxes(masks),
                            "query_index": query, "reference_points": out["reference_points"][b, query]})
            sampling = self.transformer.decoder[-1].cross_attn.last_sampling
            if self.transformer.decoder[-1].cross_attn.keep_sampling and sampling is not None:
                # Map from padded-map coordinates to the image's own [0, 1] coordinates.
                locations = sampling[0][b, query] / out["valid_ratios"][b][None, None, :, None, :]
                results[-1]["sampling_locations"], results[-1]["sampling_weights"] = locations, sampling[1][b, query]
        return results

    def record_sampling(self, enabled: bool = True) -> None:
        """Also return, per detection, where the last decoder layer's deformable attention sampled:
        ``sampling_locations`` (K, heads, levels, points, 2) in image-normalized (x, y) and
        ``sampling_weights`` (K, heads, levels, points)."""
        attn = self.transformer.decoder[-1].cross_attn
        attn.keep_sampling, attn.last_sampling = enabled, None

    def upsample_masks(self, probs: Tensor, image_size: tuple[int, int], output_size: tuple[int, int],
                       chunk: int = 8) -> Tensor:
        """(K, h, w) probabilities at the mask stride -> (K, H, W) bool; chunked to bound memory and keep the
        float temporaries near cache size (the threshold writes straight into the output)."""
        out = torch.empty((probs.shape[0], *output_size), dtype=torch.bool, device=probs.device)
        for i in range(0, probs.shape[0], chunk):
            torch.gt(self.upsample_probs(probs[i : i + chunk], image_size, output_size), self.cfg.mask_threshold,
                     out=out[i : i + chunk])
        return out

    def upsample_probs(self, probs: Tensor, image_size: tuple[int, int], output_size: tuple[int, int]) -> Tensor:
        """(K, h, w) probabilities at the mask stride -> (K, H, W) probabilities at ``output_size``: bilinear up
        by the stride, cropped to the image (the batch's padding), bilinear to the output size."""
        h, w = image_size
        p = F.interpolate(probs[:, None], scale_factor=self.cfg.mask_stride, mode="bilinear",
                          align_corners=False)[:, :, :h, :w]
        if (h, w) != tuple(output_size):
            p = F.interpolate(p, size=output_size, mode="bilinear", align_corners=False)
        # flatten, not squeeze(1) or p[:, 0]: in ONNX a Reshape of static rank (squeeze of a dimension the
        # exporter cannot prove is 1 becomes an If of unknown rank; p[:, 0] a Gather that copies every mask).
        return p.flatten(0, 1)


def rank_detections(logits: Tensor, mask_logits: Tensor, k: int, mask_threshold: float
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One image's NMS-free ranking: the top-k (query, class) pairs by sigmoid score, each score times its mask's
    maskness (mean probability inside the thresholded mask), sorted. logits (Q, C), mask_logits (Q, h, w) ->
    scores, labels, query indices (k,) and mask probabilities (k, h, w)."""
    C = logits.shape[-1]
    scores, idx = logits.float().sigmoid().flatten().topk(k)  # float: no AMP ties
    query, labels = idx // C, idx % C
    probs = mask_logits[query].sigmoid().float()
    binary = probs > mask_threshold
    maskness = (probs * binary).flatten(1).sum(1) / binary.flatten(1).sum(1).clamp(min=1)
    scores = scores * maskness
    order = scores.argsort(descending=True)
    return scores[order], labels[order], query[order], probs[order]


def mask_boxes(masks: Tensor) -> Tensor:
    """(K, H, W) bool -> (K, 4) xyxy boxes of the masks (pixel indices, as torchvision's masks_to_boxes),
    zeros for empty masks; from the masks' row and column projections (two passes over the bytes)."""
    K, H, W = masks.shape
    if not exporting() and (K == 0 or H == 0 or W == 0):
        return torch.zeros(K, 4, device=masks.device)
    if exporting():  # ONNX has no reinterpreting view: a cast
        flat = masks.to(torch.uint8) if masks.dtype == torch.bool else (masks != 0).to(torch.uint8)
    else:
        flat = masks.view(torch.uint8) if masks.dtype == torch.bool else (masks != 0).view(torch.uint8)
    cols, rows = flat.amax(1), flat.amax(2)  # (K, W), (K, H): any pixel in each column / row
    nonempty = rows.amax(1) > 0
    # argmax returns the first maximal index: the first occupied column/row from either end.
    x0, y0 = cols.argmax(1), rows.argmax(1)
    x1, y1 = W - 1 - cols.flip(1).argmax(1), H - 1 - rows.flip(1).argmax(1)
    return torch.stack([x0, y0, x1, y1], 1).float() * nonempty[:, None]


def _pad_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    return F.pad(masks, (0, size[1] - masks.shape[-1], 0, size[0] - masks.shape[-2]))


def _check_images(images: list[Tensor]) -> None:
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError("images must be a non-empty list of [3, H, W] float tensors")
    for i, im in enumerate(images):
        if not isinstance(im, Tensor) or not im.is_floating_point():
            raise ValueError(f"images[{i}] must be a float tensor in [0, 1], got "
                             f"{type(im).__name__ if not isinstance(im, Tensor) else im.dtype}")
        if im.dim() != 3 or im.shape[0] != 3 or im.shape[1] < 1 or im.shape[2] < 1:
            raise ValueError(f"images[{i}] must have shape [3, H, W], got {list(im.shape)}")


def _check_targets(images: list[Tensor], targets: list[dict[str, Tensor]], num_classes: int) -> None:
    if len(targets) != len(images):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    for i, (im, t) in enumerate(zip(images, targets)):
        if not isinstance(t, dict) or "labels" not in t or "masks" not in t:
            raise ValueError(f"targets[{i}] must be a dict with 'labels' and 'masks'")
        labels, masks = t["labels"], t["masks"]
        if labels.dtype != torch.int64 or labels.dim() != 1:
            raise ValueError(f"targets[{i}]['labels'] must be int64 [N], got {labels.dtype} {list(labels.shape)}")
        if masks.dtype != torch.bool or masks.dim() != 3:
            raise ValueError(f"targets[{i}]['masks'] must be bool [N, H, W], got {masks.dtype} {list(masks.shape)}")
        if masks.shape[0] != labels.shape[0] or masks.shape[1:] != im.shape[1:]:
            raise ValueError(f"targets[{i}]['masks'] has shape {list(masks.shape)}; expected "
                             f"[{labels.shape[0]}, {im.shape[1]}, {im.shape[2]}] (N labels, image size)")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"targets[{i}]['labels'] out of range [0, {num_classes}): "
                             f"min {int(labels.min())}, max {int(labels.max())}")


def build_model(preset: str | Config = "isda_r50_coco", num_classes: int | None = None, **overrides) -> ISDA:
    """Build an ISDA model from a preset name (or a Config), e.g. ``build_model("isda_tiny", num_classes=5)``.
    Overrides are model/loss fields, e.g. ``mask_stride=8`` or ``loss.dice_weight=5``."""
    cfg = get_preset(preset) if isinstance(preset, str) else copy.deepcopy(preset)
    if num_classes is not None:
        overrides["model.num_classes"] = num_classes
    overrides = {k if "." in k else _section_of(k) + k: v for k, v in overrides.items()}
    apply_overrides(cfg, overrides)
    return ISDA(cfg.model, cfg.loss)


def _section_of(key: str) -> str:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    loss = {f.name for f in dataclasses.fields(LossConfig)}
    if key in names:
        return "model."
    if key in loss:
        return "loss."
    raise ConfigError(f"unknown model option '{key}'")
