"""Command line: ``isda shapes | train | eval | predict | export | demo | convert | convert labels``.

Every user error (missing file, bad image, bad config key, checkpoint of another model) exits with
status 2 and one line on stderr; ``ISDA_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .fileio import check_writable_dir, check_writable_file, first_line

EXAMPLES = {
    "shapes": """examples:
  isda shapes data/shapes                          # 2000 train + 200 val images, 128 px
  isda shapes data/shapes --num-train 200 --size 96 --seed 1""",
    "train": """examples:
  isda train --preset isda_tiny --data data/shapes --out runs/tiny
  isda train --preset isda_r50_coco --data /datasets/coco --train-split train2017 --val-split val2017 \\
             --set train.batch_size=2 --set train.lr=2.5e-5 --init deformable_detr_r50.pth --out runs/r50
  isda train --config my.yaml --ann train.json --images imgs/ --val-ann val.json --val-images imgs/ --out runs/x
  isda train --out runs/tiny --resume                # continue from runs/tiny/last.pt
  torchrun --nproc_per_node=8 -m isda train --preset isda_r50_coco --data /datasets/coco --out runs/r50""",
    "eval": """examples:
  isda eval --weights runs/tiny/best.pt --data data/shapes --split val
  isda eval --weights runs/r50/best.pt --ann val.json --images val/ --results runs/r50/results.json""",
    "predict": """examples:
  isda predict --weights runs/tiny/best.pt data/shapes/val/000001.png --out runs/pred
  isda predict --weights runs/tiny/best.pt 'photos/*.jpg' folder/ --score-thr 0.5 --show-reference-points
  isda predict --weights runs/tiny/best.pt img.png --show-sampling-points
  isda predict --weights runs/r50/best.pt slide.tif --tile 1024 --tile-overlap 256   # window by window""",
    "export": """examples:
  isda export --weights runs/tiny/best.pt --out runs/tiny/model.onnx
  isda eval --weights runs/tiny/model.onnx --data data/shapes --split val      # the exported file's AP
  isda predict --weights runs/tiny/model.onnx photos/ --out runs/pred-onnx""",
    "demo": """examples:
  isda demo                                         # shapes -> train tiny (CPU) -> eval -> pictures in runs/demo
  isda demo --minutes 3 --out runs/quick""",
    "convert": """examples:
  isda convert r50_deformable_detr-checkpoint.pth isda_init.pth         # format auto-detected
  isda convert deformable-detr/model.safetensors isda_init.pth --from hf --num-classes 80
  isda convert labels --labels masks/ --images imgs/ --out train.json  # label images -> COCO json (-h: options)""",
    "convert labels": """examples:
  isda convert labels --labels masks/ --images imgs/ --out train.json --category nucleus
  isda convert labels --labels masks/ --images imgs/ --out train.json --class-maps classes/ --categories cats.json
  (cats.json: {"1": "nucleus", "2": "cell"}; then: isda train --ann train.json --images imgs/ --out runs/mine)""",
}


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------
# Shared argument handling


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="isda", description="ISDA instance segmentation: train, evaluate, predict.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{shapes,train,eval,predict,export,demo,convert}")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    s = add("shapes", "Generate the built-in COCO-format shapes dataset.")
    s.add_argument("out", help="dataset root (gets train/, val/, annotations/)")
    s.add_argument("--num-train", type=int, default=2000)
    s.add_argument("--num-val", type=int, default=200)
    s.add_argument("--size", type=int, default=128, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0)

    t = add("train", "Train ISDA on a COCO-format dataset (works under torchrun).")
    _config_args(t)
    _dataset_args(t, splits=("train", "val"))
    t.add_argument("--val-ann", help="validation annotation json (with --ann/--images)")
    t.add_argument("--val-images", help="validation image folder (with --ann/--images)")
    t.add_argument("--out", required=True, help="run directory (config.yaml, metrics.jsonl, last.pt, best.pt, curves.png)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--init", help="initial weights: Deformable-DETR (hf/detr/mmdet) or an isda checkpoint")
    t.add_argument("--from-scratch", action="store_true",
                   help="train the backbone from random weights (BatchNorm, nothing frozen; recorded as "
                        "model.from_scratch in the run's config). Without weights (--init or model.backbone_weights) "
                        "a frozen backbone stops training with an error")
    t.add_argument("--max-iters", type=int, help="stop after this many optimizer steps")
    t.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")

    e = add("eval", "Evaluate a checkpoint: COCO mask AP table and a results JSON.")
    e.add_argument("--weights", required=True, help="isda checkpoint (best.pt / last.pt) or isda export (.onnx)")
    _dataset_args(e, splits=("val",))
    e.add_argument("--results", help="where to write the COCO results JSON (default: next to the weights)")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--device")

    pr = add("predict", "Segment images: overlay PNGs and one COCO results JSON.")
    pr.add_argument("--weights", required=True, help="isda checkpoint or isda export (.onnx: ONNX Runtime, CPU)")
    pr.add_argument("paths", nargs="+", help="image files, folders or globs")
    pr.add_argument("--out", default="runs/predict", help="output folder")
    pr.add_argument("--score-thr", type=float, default=0.3)
    pr.add_argument("--show-reference-points", action="store_true",
                    help="mark each detection's reference point; also write a figure of all queries' points")
    pr.add_argument("--show-sampling-points", action="store_true",
                    help="draw where the last decoder layer sampled for the top detections (size = weight); also "
                         "write a figure with one panel per feature level")
    pr.add_argument("--tile", type=int, metavar="SIZE",
                    help="large images: predict overlapping SIZE x SIZE windows (each resized like the test "
                         "pipeline, so choose SIZE for the objects to keep a useful size) and merge them")
    pr.add_argument("--tile-overlap", type=int, metavar="PX",
                    help="overlap of neighbouring windows (default: SIZE // 4); objects smaller than half of it "
                         "are found exactly once, with their whole mask")
    pr.add_argument("--device")

    x = add("export", "Export a checkpoint to ONNX: the whole NMS-free model, post-processing included, one graph.")
    x.add_argument("--weights", required=True, help="isda checkpoint (best.pt / last.pt)")
    x.add_argument("--out", required=True, help="the .onnx file to write")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")

    d = add("demo", "Generate shapes, train the tiny preset on CPU, evaluate, draw pictures.")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--data", default="data/shapes", help="where the shapes dataset lives / is generated")
    d.add_argument("--minutes", type=float, default=None, help="training budget in minutes (default: 9)")
    d.add_argument("--device")

    c = add("convert", "Convert Deformable-DETR weights (hf / detr / mmdet) to an isda initialisation file "
                       "(instance label images to COCO json: isda convert labels).")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--from", dest="fmt", choices=["hf", "detr", "mmdet"], help="source format (default: detect)")
    _config_args(c)
    c.add_argument("--num-classes", type=int, default=None)
    c.add_argument("--coco-classes", action="store_true",
                   help="the source's class head is COCO's 91-id one (hf/detr): keep its 80 COCO rows")
    return p


def _labels_parser() -> argparse.ArgumentParser:
    """``isda convert labels``: its own parser, as ``isda convert SRC DST`` takes positionals."""
    p = argparse.ArgumentParser(
        prog="isda convert labels", epilog=EXAMPLES["convert labels"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Instance label images (PNG/TIFF, 8/16/32-bit, 0 = background, one value per instance) -> a "
                    "COCO instance-segmentation json (RLE). A label image is matched to its image by file stem, "
                    "optionally + _label, _labels, _mask or _masks.")
    p.set_defaults(command="convert labels")
    p.add_argument("--labels", required=True, help="folder of instance label images")
    p.add_argument("--images", required=True, help="folder of the images (file_name in the json is relative to it)")
    p.add_argument("--out", required=True, help="the COCO json to write")
    p.add_argument("--class-maps", help="folder of semantic label images (pixel value = category id, 0 = none): "
                                        "each instance takes the majority class under its pixels")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--categories", help='JSON file of category names, e.g. {"1": "nucleus", "2": "cell"} '
                                        "(default: class_<id> for the ids found)")
    g.add_argument("--category", default="object", help="the one category's name without --class-maps")
    return p


def _config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", help="isda_tiny | isda_r50_coco (train: default isda_tiny, or the run's config on "
                                    "--resume; convert: default isda_r50_coco)")
    g.add_argument("--config", help="YAML config (optionally 'preset: NAME' plus overrides)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. train.lr=1e-4 or model.mask_stride=8 (repeatable)")


def _dataset_args(p: argparse.ArgumentParser, splits: tuple[str, ...]) -> None:
    p.add_argument("--data", help="COCO root with annotations/instances_<split>.json and <split>/ images")
    if "train" in splits:
        p.add_argument("--train-split", default="train")
        p.add_argument("--val-split", default="val", help="'' to train without validation")
    else:
        p.add_argument("--split", default="val")
    p.add_argument("--ann", help="annotation json (instead of --data)")
    p.add_argument("--images", help="image folder for --ann")


def _resolve_config(args: argparse.Namespace, default_preset: str = "isda_tiny"):
    from .config import apply_overrides, get_preset, load_config

    cfg = load_config(args.config) if args.config else get_preset(args.preset or default_preset)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    return apply_overrides(cfg, overrides).validate()


def _split(args: argparse.Namespace, split: str) -> tuple[str, str]:
    from .data import coco_split_paths

    if args.ann or args.images:
        if not (args.ann and args.images):
            raise UserError("--ann and --images go together")
        return args.ann, args.images
    if not args.data:
        raise UserError("give a dataset: --data ROOT (COCO layout) or --ann FILE --images DIR")
    ann, images = coco_split_paths(args.data, split)
    return str(ann), str(images)


# ---------------------------------------------------------------------------------------------------
# Commands


def cmd_shapes(args: argparse.Namespace) -> None:
    from .data.shapes import make_shapes_dataset

    t0 = time.time()
    paths = make_shapes_dataset(args.out, num_train=args.num_train, num_val=args.num_val,
                                image_size=args.size, seed=args.seed)
    for split, (ann, images) in paths.items():
        print(f"{split}: {ann}  images: {images}")
    print(f"done in {time.time() - t0:.1f}s")


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from . import engine
    from .inference import draw_run

    out = Path(args.out)
    if args.resume and not args.config and not args.preset and (out / "config.yaml").is_file():
        args.config = str(out / "config.yaml")  # resume with the run's own configuration
    cfg = _resolve_config(args)
    if args.from_scratch:
        from .config import apply_from_scratch

        cfg = apply_from_scratch(cfg).validate()
    train_ann, train_images = _split(args, getattr(args, "train_split", "train"))
    val_ann = val_images = None
    if args.val_ann or args.val_images:
        if not (args.val_ann and args.val_images):
            raise UserError("--val-ann and --val-images go together")
        val_ann, val_images = args.val_ann, args.val_images
    elif args.data and args.val_split:
        val_ann, val_images = _split(args, args.val_split)
    summary = engine.train(cfg, train_ann, train_images, val_ann, val_images, out_dir=out, resume=args.resume,
                           max_iters=args.max_iters, device=args.device, init=args.init,
                           on_validation=draw_run)
    return summary


def cmd_eval(args: argparse.Namespace) -> None:
    from .data import CocoInstanceDataset, build_transforms
    from .engine import evaluate
    from .engine.evaluation import write_results_json
    from .inference import load_trained_model

    loaded = load_trained_model(args.weights, _device(args.device))
    ann, images = _split(args, args.split)
    path = Path(args.results) if args.results else Path(args.weights).with_name(f"results_{Path(ann).stem}.json")
    check_writable_file(path, "--results" if args.results else "results file (next to --weights; set --results)")
    dataset = CocoInstanceDataset(ann, images, build_transforms(loaded.cfg.data, train=False), train=False)
    if dataset.cat_ids != loaded.cat_ids:
        raise UserError(f"{ann}: categories {dataset.cat_ids} differ from the checkpoint's {loaded.cat_ids}")
    dataset.require_instances()
    result, results = evaluate(loaded.model, dataset, _device(args.device), batch_size=args.batch_size)
    write_results_json(results, path)
    report = _eval_report(args, loaded, dataset, result, path)
    print(result.table())
    print(f"results: {path}\nreport: {report}")


def _eval_report(args: argparse.Namespace, loaded, dataset, result, results_path: Path) -> Path:
    """``<results>_report.html`` (and ``<results>_predictions.png``) next to the results JSON: not
    ``report.html``, which, next to a checkpoint, is the training run's own."""
    from .config import config_yaml
    from .inference import save_examples
    from .report import write_run_report

    stem = results_path.with_suffix("").name
    picture = save_examples(loaded.model, loaded.cfg.data, dataset, results_path.with_name(f"{stem}_predictions.png"))
    return write_run_report(
        results_path.parent, path=results_path.with_name(f"{stem}_report.html"),
        title=f"isda eval: {Path(args.weights).name} on {dataset.ann_file.name}",
        stats=result.stats, per_category=result.per_category,
        pictures=[(picture, "The first images: ground truth (left) beside the prediction (right).")] if picture else [],
        files=[results_path], config_text=config_yaml(loaded.cfg),
        summary={"weights": str(args.weights), "images": len(dataset)})


def cmd_predict(args: argparse.Namespace) -> None:
    import torch

    from .data import load_rgb
    from .engine.evaluation import write_results_json
    from .inference import load_trained_model

    if args.tile is None and args.tile_overlap is not None:
        raise UserError("--tile-overlap goes with --tile")
    if args.tile is not None:
        from .tiling import check_tile_args

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
    loaded = load_trained_model(args.weights, _device(args.device))
    if args.show_sampling_points:
        loaded.model.record_sampling()
    predict_one = _predict_tiled if args.tile is not None else _predict_whole
    results, done = [], 0
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
    from .engine.evaluation import predictions_to_coco_results
    from .inference import predict_and_draw, query_reference_points
    from .visualize import plot_reference_points, plot_sampling_points, save_png

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
    from .inference import predict
    from .tiling import draw_tiled, predict_tiled
    from .visualize import save_png

    tiled = predict_tiled(lambda window: predict(loaded.model, loaded.cfg.data, [window])[0], image.float() / 255,
                          args.tile, args.tile_overlap, args.score_thr)
    save_png(draw_tiled(image, tiled, loaded.class_names, args.score_thr), out / f"{stem}_pred.png")
    return tiled.coco_results(image_id, loaded.cat_ids), f"{tiled.num_windows} windows, {len(tiled)} instances"


def cmd_export(args: argparse.Namespace) -> None:
    from .deploy.onnx_export import INPUTS, OUTPUTS, export_onnx

    if args.opset < 17:
        raise UserError(f"--opset must be >= 17 (GridSample, LayerNormalization), got {args.opset}")
    info = export_onnx(args.weights, args.out, opset=args.opset)
    print(f"wrote {info.path} ({info.size_bytes / 2**20:.1f} MiB, opset {info.opset}, {info.seconds:.1f} s)")
    print("inputs:  " + ", ".join(INPUTS) + "; outputs: " + ", ".join(OUTPUTS) + " (meanings in the model's metadata)")
    print(f"check its AP: isda eval --weights {info.path} --ann VAL.json --images VAL/")


def _find_images(paths: list[str]) -> list[str]:
    from .data.images import IMAGE_EXTS

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


def _device(name: str | None):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def cmd_convert(args: argparse.Namespace) -> None:
    from .models.isda import ISDA
    from .weights import COCO_CATEGORY_IDS, load_pretrained, save_converted

    if args.coco_classes and args.num_classes not in (None, 80):
        raise UserError("--coco-classes keeps COCO's 80 classes: drop --num-classes or set it to 80")
    cfg = _resolve_config(args, default_preset="isda_r50_coco")
    if args.coco_classes or args.num_classes:
        cfg.model.num_classes = 80 if args.coco_classes else args.num_classes
    model = ISDA(cfg.model, cfg.loss)
    report = load_pretrained(args.src, model, fmt=args.fmt,
                             class_indices=COCO_CATEGORY_IDS if args.coco_classes else None)
    save_converted(model, args.dst, report)
    print(report)
    print(f"wrote {args.dst}  (use: isda train --init {args.dst} ...)")


def cmd_convert_labels(args: argparse.Namespace) -> None:
    from .data.labelmaps import labelmaps_to_coco

    out = check_writable_file(args.out, "--out")
    done = labelmaps_to_coco(args.labels, args.images, out, class_maps_dir=args.class_maps,
                             categories=args.categories, category_name=args.category)
    names = ", ".join(f"{i}: {n}" for i, n in done.categories.items())
    print(f"{done.images} images, {done.instances} instances, {len(done.categories)} categories ({names})")
    print(f"wrote {done.path}")
    print(f"next: isda train --ann {done.path} --images {args.images} --out runs/mine")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # "convert labels" before argparse: "convert" alone takes SRC DST, which "labels --labels ..." would fill.
    args = _labels_parser().parse_args(argv[2:]) if argv[:2] == ["convert", "labels"] else _parser().parse_args(argv)
    commands = {"shapes": cmd_shapes, "train": cmd_train, "eval": cmd_eval, "predict": cmd_predict,
                "export": cmd_export, "convert": cmd_convert, "convert labels": cmd_convert_labels}
    from .demo import cmd_demo

    commands["demo"] = cmd_demo
    try:
        commands[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - turned into one line for the user errors below
        if os.environ.get("ISDA_DEBUG") or not _is_user_error(e):
            raise
        print(f"isda {args.command}: error: {first_line(e)}", file=sys.stderr)
        return 2
    return 0


def _is_user_error(e: Exception) -> bool:
    from .config import ConfigError
    from .data import DatasetError
    from .engine import NonFiniteLossError
    from .fileio import OutputError
    from .weights import WeightsError

    return isinstance(e, (UserError, ConfigError, DatasetError, WeightsError, OutputError, NonFiniteLossError,
                          FileNotFoundError, FileExistsError, json.JSONDecodeError))


if __name__ == "__main__":
    warnings.simplefilter("default")
    sys.exit(main())
