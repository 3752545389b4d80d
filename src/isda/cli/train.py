"""``isda train``: a run directory from a COCO-format dataset (also under torchrun)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import UserError, dataset_paths, resolve_config


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from .. import engine
    from ..inference import draw_run

    out = Path(args.out)
    if args.resume and not args.config and not args.preset and (out / "config.yaml").is_file():
        args.config = str(out / "config.yaml")  # resume with the run's own configuration
    cfg = resolve_config(args)
    if args.from_scratch:
        from ..config import apply_from_scratch

        cfg = apply_from_scratch(cfg).validate()
    train_ann, train_images = dataset_paths(args, getattr(args, "train_split", "train"))
    val_ann = val_images = None
    if args.val_ann or args.val_images:
        if not (args.val_ann and args.val_images):
            raise UserError("--val-ann and --val-images go together")
        val_ann, val_images = args.val_ann, args.val_images
    elif args.data and args.val_split:
        val_ann, val_images = dataset_paths(args, args.val_split)
    summary = engine.train(cfg, train_ann, train_images, val_ann, val_images, out_dir=out, resume=args.resume,
                           max_iters=args.max_iters, device=args.device, init=args.init,
                           on_validation=draw_run)
    return summary
