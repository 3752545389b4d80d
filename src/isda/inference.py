"""Inference from a checkpoint: rebuild the model it was trained as, resize like the test pipeline,
return predictions at each image's original size, in float32 or bfloat16 (``inference_precision``); predict one
image and draw it (``predict``, the demo, a training run's pictures)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import PRECISIONS, Config, ConfigError, DataConfig, from_dict
from .data.transforms import short_side_size
from .engine.amp import autocast
from .engine.checkpoint import CheckpointError, load_checkpoint, load_model_state
from .models.isda import ISDA
from .tiling import predict_in_windows


@dataclass
class LoadedModel:
    model: ISDA
    cfg: Config
    class_names: list[str]
    cat_ids: list[int]


def load_trained_model(path: str | os.PathLike, device: str | torch.device = "cpu",
                       runtime: str = "onnxruntime") -> LoadedModel:
    """An isda checkpoint (``last.pt`` / ``best.pt``) -> the eval-mode model with its config and classes; an
    ``isda export`` file (``.onnx``) -> the same interface over ONNX Runtime (or ``runtime="openvino"``) on the
    CPU."""
    if Path(path).suffix.lower() == ".onnx":
        from .deploy.runtime import load_onnx_model

        return load_onnx_model(path, runtime=runtime)
    if runtime != "onnxruntime":
        raise CheckpointError(f"--runtime {runtime} runs an isda export (.onnx), not {path}")
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


def inference_precision(model: ISDA, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """The context in which ``model`` predicts in ``precision``: "fp32" (nothing changes), or "bf16": autocast,
    convolutions and matrix products in bfloat16 (faster on GPUs and on CPUs with bfloat16 matrix units, e.g.
    Intel AMX), the deformable-attention core and the ranking of detections in float32 as ever. An ONNX Runtime
    model runs its graph as exported: bf16 is a ValueError there."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if hasattr(model, "predict_one"):  # an ONNX Runtime model
        raise ValueError("precision bf16 needs an isda checkpoint (an ONNX export runs in float32); use fp32")
    return autocast(next(model.parameters()).device, "bf16")


@torch.no_grad()
def resize_for_test(image: Tensor, data_cfg: DataConfig) -> Tensor:
    """float [3, H, W] in [0, 1] -> resized like the test pipeline (short side ``data_cfg.test_short_side``,
    long side at most ``data_cfg.test_max_size``)."""
    h, w = short_side_size(image.shape[1], image.shape[2], data_cfg.test_short_side, data_cfg.test_max_size)
    return F.interpolate(image[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def predict(model: ISDA, data_cfg: DataConfig, images: list[Tensor], precision: str = "fp32"
            ) -> list[dict[str, Tensor]]:
    """images: float [3, H, W] in [0, 1] at any size. Resized like the test pipeline (short side
    ``data_cfg.test_short_side``), predicted in ``precision`` (:func:`inference_precision`; "fp32" leaves the
    caller's autocast, if any, as it is), in windows of ``data_cfg.test_window`` where it is set, masks returned at
    the original size."""
    device = next(model.parameters(), torch.empty(0)).device  # an ONNX Runtime model has none: the CPU
    resized = [resize_for_test(im.to(device), data_cfg) for im in images]
    was_training = model.training
    model.eval()
    try:
        with inference_precision(model, precision):
            sizes = [tuple(im.shape[1:]) for im in images]
            if data_cfg.test_window:
                return predict_in_windows(model, resized, sizes, data_cfg.test_window)
            return model(resized, output_sizes=sizes)
    finally:
        model.train(was_training)


@torch.no_grad()
def query_reference_points(loaded: LoadedModel, image: Tensor) -> tuple[Tensor, Tensor]:
    """Every query's reference point (Q, 2) in image-normalized (x, y) and its best class score (Q,):
    the data of the paper's "visualization of reference points" figure. image: float [3, H, W]."""
    model = loaded.model
    if hasattr(model, "predict_one"):  # an ONNX Runtime model: the graph outputs them
        outputs = model.predict_one(image)
        return outputs["query_points"], outputs["query_scores"]
    device = next(model.parameters()).device
    out = model.forward_features(*model.batch_images([image.to(device)]))
    return out["reference_points"][0].cpu(), out["logits"][-1, 0].sigmoid().max(-1).values.cpu()


def predict_and_draw(model: ISDA, data_cfg: DataConfig, image: Tensor, class_names: list[str],
                     score_thr: float = 0.3, reference_points: bool = True, sampling_points: bool = False
                     ) -> tuple[dict[str, Tensor], Tensor]:
    """Predict one uint8 [3, H, W] image and draw its detections (masks, labels, scores; optionally each
    query's reference point and, after ``model.record_sampling()``, the sampling points, which a prediction in
    windows (``data_cfg.test_window``) does not have): (prediction on the CPU, drawn uint8 [3, H, W])."""
    from .visualize import detection_sampling_points, draw_predictions

    (pred,) = predict(model, data_cfg, [image.float() / 255])
    pred = {k: v.cpu() for k, v in pred.items()}
    drawn = draw_predictions(image, pred, class_names, score_thr=score_thr,
                             reference_points=pred.get("reference_points") if reference_points else None,
                             sampling_points=detection_sampling_points(pred)
                             if sampling_points and "sampling_locations" in pred else None)
    return pred, drawn


def draw_examples(model: ISDA, data_cfg: DataConfig, dataset, class_names: list[str], count: int = 6,
                  score_thr: float = 0.3) -> tuple[list[Tensor], list[str]]:
    """The first ``count`` readable images of a CocoInstanceDataset, each as two panels: its ground truth,
    then the prediction (masks, labels, scores, reference points). Returns (panels, captions) for
    :func:`isda.visualize.save_grid` (empty lists when no image is readable)."""
    from .data.images import UnusableImage
    from .visualize import draw_ground_truth

    panels: list[Tensor] = []
    captions: list[str] = []
    for index in range(len(dataset)):
        if len(panels) == 2 * count:
            break
        try:
            image, target = dataset.load(index)
        except UnusableImage:  # already reported by the evaluation that ran before: draw the next one
            continue
        image = image.as_subclass(Tensor)
        pred, drawn = predict_and_draw(model, data_cfg, image, class_names, score_thr)
        name = Path(dataset.coco.imgs[dataset.ids[index]]["file_name"]).name
        panels += [draw_ground_truth(image, target, class_names), drawn]
        captions += [f"{name}: ground truth ({len(target['labels'])})",
                     f"prediction ({int((pred['scores'] >= score_thr).sum())} >= {score_thr:g})"]
    return panels, captions


def save_examples(model: ISDA, data_cfg: DataConfig, dataset, path: Path, count: int = 6) -> Path | None:
    """:func:`draw_examples` saved as one grid, two (ground truth, prediction) pairs per row; None (and no
    file) when no image could be read."""
    from .visualize import save_grid

    panels, captions = draw_examples(model, data_cfg, dataset, dataset.class_names, count)
    if not panels:
        return None
    save_grid(panels, path, captions, ncols=4 if len(panels) > 2 else 2)
    return path


def draw_run(run_dir: Path, model: ISDA, val_set, data_cfg: DataConfig) -> None:
    """A training run's pictures and report (an ``on_validation`` callback of :func:`isda.engine.train`):
    curves.png (loss and AP so far), with a validation set val_predictions.png (four of its images, ground
    truth beside prediction), and report.html."""
    from .report import write_run_report
    from .visualize import plot_curves

    if (run_dir / "metrics.jsonl").exists():  # nothing logged yet after a zero-step run
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    if val_set is not None:
        save_examples(model, data_cfg, val_set, run_dir / "val_predictions.png", count=4)
    write_run_report(run_dir, title=f"isda training run {run_dir.name}")
