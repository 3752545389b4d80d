"""``isda predict``: overlay PNGs and one COCO results JSON for image files, folders or globs; ``--tile``
predicts a large image window by window."""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path
from typing import Any

from ..fileio import check_writable_dir
from .common import UserError, pick_device, precision_context


def cmd_predict(args: argparse.Namespace) -> None:
    import torch

    from ..data import load_rgb
    from ..engine.evaluation import write_results_json
    from ..inference import load_trained_model

    if args.tile is None and args.tile_overlap is not None:
        raise UserError("--tile-overlap goes with --tile")
    if args.tile is not None:
        from ..tiling import check_tile_args

        if args.tile_overlap is None:
            args.tile_overlap = args.tile // 4
        try:
            check_tile_args(args.tile, args.tile_overlap)
        except ValueError as e:
            raise UserError(str(e)) from None
        if args.show_reference_points or args.show_sampling_points:
            raise UserError("--show-reference-points and --show-sampling-points draw one view's queries: "
                            "not with --tile")
    files = _find_images(args.paths)
    out = check_writable_dir(args.out, "--out")
    loaded = load_trained_model(args.weights, pick_device(args.device), runtime=args.runtime)
    precision = precision_context(args, loaded)
    if args.show_sampling_points:
        loaded.model.record_sampling()
    predict_one = _predict_tiled if args.tile is not None else _predict_whole
    results, done = [], 0
    with precision:
        for path in files:
            try:
                array = load_rgb(path)
            except Exception as e:  # unreadable / corrupt image: say which and go on with the others
                print(f"warning: skipping {path}: {e}", file=sys.stderr)
                continue
            image = torch.from_numpy(array).permute(2, 0, 1).contiguous()
            stem = f"{Path(path).stem}"
            # The id is the index among the images listed below (skipped files take none).
            entries, summary = predict_one(args, loaded, image, out, stem, done)
            results += entries
            done += 1
            print(f"{path}: {summary} -> {out / f'{stem}_pred.png'}")
    if done == 0:
        raise UserError(f"none of the {len(files)} images could be read")
    write_results_json(results, out / "results.json")
    print(f"results: {out / 'results.json'} (image_id = index in the order listed above)")


def _predict_whole(args: argparse.Namespace, loaded, image, out: Path, stem: str, image_id: int
                   ) -> tuple[list[dict[str, Any]], str]:
    """One view of the whole image, resized like the test pipeline: (results entries, what to print)."""
    from ..engine.evaluation import predictions_to_coco_results
    from ..inference import predict_and_draw, query_reference_points
    from ..visualize import plot_reference_points, plot_sampling_points, save_png

    pred, drawn = predict_and_draw(loaded.model, loaded.cfg.data, image, loaded.class_names, args.score_thr,
                                   args.show_reference_points, args.show_sampling_points)
    keep = pred["scores"] >= args.score_thr
    save_png(drawn, out / f"{stem}_pred.png")
    if args.show_reference_points:
        points, scores = query_reference_points(loaded, image.float() / 255)
        plot_reference_points(points, scores, out / f"{stem}_reference_points.png", image=image)
    if args.show_sampling_points and "sampling_locations" in pred and len(pred["scores"]):
        plot_sampling_points(image, pred, loaded.class_names, out / f"{stem}_sampling_points.png", args.score_thr)
    entries = predictions_to_coco_results([{k: v[keep] for k, v in pred.items()}], [image_id], loaded.cat_ids)
    return entries, f"{int(keep.sum())} instances"


def _predict_tiled(args: argparse.Namespace, loaded, image, out: Path, stem: str, image_id: int
                   ) -> tuple[list[dict[str, Any]], str]:
    """``--tile``: window by window, merged (:mod:`isda.tiling`): (results entries, what to print)."""
    from ..inference import predict
    from ..tiling import draw_tiled, predict_tiled
    from ..visualize import save_png

    tiled = predict_tiled(lambda window: predict(loaded.model, loaded.cfg.data, [window])[0], image.float() / 255,
                          args.tile, args.tile_overlap, args.score_thr)
    save_png(draw_tiled(image, tiled, loaded.class_names, args.score_thr), out / f"{stem}_pred.png")
    return tiled.coco_results(image_id, loaded.cat_ids), f"{tiled.num_windows} windows, {len(tiled)} instances"


def _find_images(paths: list[str]) -> list[str]:
    from ..data.images import IMAGE_EXTS

    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(str(f) for f in Path(p).iterdir() if f.suffix.lower() in IMAGE_EXTS)
        elif any(ch in p for ch in "*?["):
            files += sorted(f for f in glob.glob(p, recursive=True) if Path(f).suffix.lower() in IMAGE_EXTS)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise UserError(f"no such file or folder: {p}")
    if not files:
        raise UserError(f"no images found in {' '.join(paths)} (extensions: {', '.join(sorted(IMAGE_EXTS))})")
    return files
