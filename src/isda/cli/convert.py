"""``isda convert``: Deformable-DETR weights -> an isda initialisation file; ``isda convert labels``: instance
label images -> a COCO json; ``isda convert labelme``: labelme's JSON files -> a COCO json."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..fileio import check_writable_file
from .common import UserError, resolve_config

if TYPE_CHECKING:
    from ..data.labelmaps import LabelConversion


def cmd_convert(args: argparse.Namespace) -> None:
    from ..models.isda import ISDA
    from ..weights import COCO_CATEGORY_IDS, load_pretrained, save_converted

    if args.coco_classes and args.num_classes not in (None, 80):
        raise UserError("--coco-classes keeps COCO's 80 classes: drop --num-classes or set it to 80")
    cfg = resolve_config(args, default_preset="isda_r50_coco")
    if args.coco_classes or args.num_classes:
        cfg.model.num_classes = 80 if args.coco_classes else args.num_classes
    model = ISDA(cfg.model, cfg.loss)
    report = load_pretrained(args.src, model, fmt=args.fmt,
                             class_indices=COCO_CATEGORY_IDS if args.coco_classes else None)
    save_converted(model, args.dst, report)
    print(report)
    print(f"wrote {args.dst}  (use: isda train --init {args.dst} ...)")


def cmd_convert_labels(args: argparse.Namespace) -> None:
    from ..data.labelmaps import labelmaps_to_coco

    out = check_writable_file(args.out, "--out")
    done = labelmaps_to_coco(args.labels, args.images, out, class_maps_dir=args.class_maps,
                             categories=args.categories, category_name=args.category)
    _report(done, args.images)


def cmd_convert_labelme(args: argparse.Namespace) -> None:
    from ..data.labelme import labelme_to_coco

    out = check_writable_file(args.out, "--out")
    _report(labelme_to_coco(args.folder, out, labels_file=args.labels), args.folder)


def _report(done: "LabelConversion", images: str) -> None:
    names = ", ".join(f"{i}: {n}" for i, n in done.categories.items())
    print(f"{done.images} images, {done.instances} instances, {len(done.categories)} categories ({names})")
    print(f"wrote {done.path}")
    print(f"next: isda train --ann {done.path} --images {images} --out runs/mine")
