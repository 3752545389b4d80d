"""Inference from a checkpoint: rebuild the model it was trained as, resize like the test pipeline,
return predictions at each image's original size."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import CheckpointError, load_checkpoint, load_model_state
from .config import Config, ConfigError, DataConfig, from_dict
from .data.transforms import short_side_size
from .model import ISDA


@dataclass
class LoadedModel:
    model: ISDA
    cfg: Config
    class_names: list[str]
    cat_ids: list[int]


def load_trained_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """An isda checkpoint (``last.pt`` / ``best.pt``) -> the eval-mode model with its config and classes."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path}: no config stored; is this an isda training checkpoint?")
    try:
        cfg = from_dict(ckpt["config"]).validate()
    except ConfigError as e:
        raise CheckpointError(f"{path}: stored config is invalid ({e})") from None
    cfg.model.backbone_weights = None  # the checkpoint already holds the trained backbone
    model = ISDA(cfg.model, cfg.loss)
    load_model_state(model, ckpt["model"], source=str(path))
    names = list(ckpt.get("class_names") or [str(i) for i in range(cfg.model.num_classes)])
    cat_ids = list(ckpt.get("cat_ids") or range(1, cfg.model.num_classes + 1))
    return LoadedModel(model.to(device).eval(), cfg, names, cat_ids)


@torch.no_grad()
def predict(model: ISDA, data_cfg: DataConfig, images: list[Tensor]) -> list[dict[str, Tensor]]:
    """images: float [3, H, W] in [0, 1] at any size. Resized like the test pipeline (short side
    ``data_cfg.test_short_side``), predicted, masks returned at the original size."""
    device = next(model.parameters()).device
    resized = []
    for im in images:
        h, w = short_side_size(im.shape[1], im.shape[2], data_cfg.test_short_side, data_cfg.test_max_size)
        resized.append(F.interpolate(im[None].to(device), size=(h, w), mode="bilinear", antialias=True,
                                     align_corners=False)[0].clamp(0, 1))
    was_training = model.training
    model.eval()
    try:
        return model(resized, output_sizes=[tuple(im.shape[1:]) for im in images])
    finally:
        model.train(was_training)


@torch.no_grad()
def query_reference_points(loaded: LoadedModel, image: Tensor) -> tuple[Tensor, Tensor]:
    """Every query's reference point (Q, 2) in image-normalized (x, y) and its best class score (Q,):
    the data of the paper's "visualization of reference points" figure. image: float [3, H, W]."""
    model = loaded.model
    device = next(model.parameters()).device
    out = model.forward_features(*model.batch_images([image.to(device)]))
    return out["reference_points"][0].cpu(), out["logits"][-1, 0].sigmoid().max(-1).values.cpu()


def draw_examples(model: ISDA, data_cfg: DataConfig, dataset, class_names: list[str], count: int = 6,
                  score_thr: float = 0.3) -> list[Tensor]:
    """The first ``count`` images of a CocoInstanceDataset with their predictions (masks, labels, scores,
    reference points) drawn: uint8 [3, H, W] each."""
    from .visualize import draw_predictions

    drawn = []
    for index in range(min(count, len(dataset))):
        image = dataset.load(index)[0].as_subclass(Tensor)
        (pred,) = predict(model, data_cfg, [image.float() / 255])
        pred = {k: v.cpu() for k, v in pred.items()}
        drawn.append(draw_predictions(image, pred, class_names, score_thr=score_thr,
                                      reference_points=pred["reference_points"]))
    return drawn
