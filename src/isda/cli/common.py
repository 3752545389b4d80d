"""What several verbs share: the user-error type, the configuration, the dataset and the device."""

from __future__ import annotations

import argparse

import torch

from ..config import Config


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def resolve_config(args: argparse.Namespace, default_preset: str = "isda_tiny") -> Config:
    """``--preset`` or ``--config``, then every ``--set KEY=VALUE``, validated."""
    from ..config import apply_overrides, get_preset, load_config

    cfg = load_config(args.config) if args.config else get_preset(args.preset or default_preset)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    return apply_overrides(cfg, overrides).validate()


def dataset_paths(args: argparse.Namespace, split: str) -> tuple[str, str]:
    """(annotation json, image folder): ``--ann``/``--images``, or ``split`` of the ``--data`` COCO root."""
    from ..data import coco_split_paths

    if args.ann or args.images:
        if not (args.ann and args.images):
            raise UserError("--ann and --images go together")
        return args.ann, args.images
    if not args.data:
        raise UserError("give a dataset: --data ROOT (COCO layout) or --ann FILE --images DIR")
    ann, images = coco_split_paths(args.data, split)
    return str(ann), str(images)


def pick_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
