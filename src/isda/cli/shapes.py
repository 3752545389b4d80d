"""``isda shapes``: generate the built-in COCO-format shapes dataset."""

from __future__ import annotations

import argparse
import time


def cmd_shapes(args: argparse.Namespace) -> None:
    from ..data.shapes import make_shapes_dataset

    t0 = time.time()
    paths = make_shapes_dataset(args.out, num_train=args.num_train, num_val=args.num_val,
                                image_size=args.size, seed=args.seed)
    for split, (ann, images) in paths.items():
        print(f"{split}: {ann}  images: {images}")
    print(f"done in {time.time() - t0:.1f}s")
