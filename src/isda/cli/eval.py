"""``isda eval``: COCO mask AP of a checkpoint (or .onnx export), its results JSON and a report page."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..fileio import check_writable_file
from .common import UserError, dataset_paths, pick_device, precision_context


def cmd_eval(args: argparse.Namespace) -> None:
    from ..data import CocoInstanceDataset, build_transforms
    from ..engine import evaluate
    from ..engine.evaluation import write_results_json
    from ..inference import load_trained_model

    loaded = load_trained_model(args.weights, pick_device(args.device), runtime=args.runtime)
    precision = precision_context(args, loaded)
    ann, images = dataset_paths(args, args.split)
    path = Path(args.results) if args.results else Path(args.weights).with_name(f"results_{Path(ann).stem}.json")
    check_writable_file(path, "--results" if args.results else "results file (next to --weights; set --results)")
    dataset = CocoInstanceDataset(ann, images, build_transforms(loaded.cfg.data, train=False), train=False)
    if dataset.cat_ids != loaded.cat_ids:
        raise UserError(f"{ann}: categories {dataset.cat_ids} differ from the checkpoint's {loaded.cat_ids}")
    dataset.require_instances()
    with precision:
        result, results = evaluate(loaded.model, dataset, pick_device(args.device), batch_size=args.batch_size,
                                   window=loaded.cfg.data.test_window)
        write_results_json(results, path)
        report = _eval_report(args, loaded, dataset, result, path)
    print(result.table())
    print(f"results: {path}\nreport: {report}")


def _eval_report(args: argparse.Namespace, loaded, dataset, result, results_path: Path) -> Path:
    """``<results>_report.html`` (and ``<results>_predictions.png``) next to the results JSON: not
    ``report.html``, which, next to a checkpoint, is the training run's own."""
    from ..config import config_yaml
    from ..inference import save_examples
    from ..report import write_run_report

    stem = results_path.with_suffix("").name
    picture = save_examples(loaded.model, loaded.cfg.data, dataset, results_path.with_name(f"{stem}_predictions.png"))
    return write_run_report(
        results_path.parent, path=results_path.with_name(f"{stem}_report.html"),
        title=f"isda eval: {Path(args.weights).name} on {dataset.ann_file.name}",
        stats=result.stats, per_category=result.per_category,
        pictures=[(picture, "The first images: ground truth (left) beside the prediction (right).")] if picture else [],
        files=[results_path], config_text=config_yaml(loaded.cfg),
        summary={"weights": str(args.weights), "images": len(dataset)})
