"""Reading the command line: every verb's options, and ``main``, which runs the verb's ``cmd_*`` function.

A verb's options are declared once, in its ``_<verb>_args`` function below (options shared by verbs: the
``_*_args`` helpers after them). Every user error (missing file, bad image, bad config key, checkpoint of another
model) exits with status 2 and one line on stderr; ``ISDA_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

from ..config import PRECISIONS
from ..fileio import first_line
from .common import UserError
from .convert import cmd_convert, cmd_convert_labelme, cmd_convert_labels
from .demo import DEMO_MINUTES, cmd_demo
from .eval import cmd_eval
from .export import cmd_export
from .predict import cmd_predict
from .shapes import cmd_shapes
from .train import cmd_train

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
  isda predict --weights runs/tiny/model.onnx photos/ --out runs/pred-onnx
  isda export --weights runs/tiny/best.pt --out runs/tiny/model.onnx --int8 --calib-images data/shapes/train
  isda predict --weights runs/tiny/model.onnx photos/ --runtime openvino    # OpenVINO instead of ONNX Runtime""",
    "demo": """examples:
  isda demo                                         # shapes -> train tiny (CPU) -> eval -> pictures in runs/demo
  isda demo --minutes 3 --out runs/quick""",
    "convert": """examples:
  isda convert r50_deformable_detr-checkpoint.pth isda_init.pth         # format auto-detected
  isda convert deformable-detr/model.safetensors isda_init.pth --from hf --num-classes 80
  isda convert labels --labels masks/ --images imgs/ --out train.json  # label images -> COCO json (-h: options)
  isda convert labelme annotated/ --out train.json                      # labelme JSON files -> COCO json""",
    "convert labelme": """examples:
  isda convert labelme annotated/ --out train.json
  isda convert labelme annotated/ --out train.json --labels labels.txt   # category ids in labels.txt's order""",
    "convert labels": """examples:
  isda convert labels --labels masks/ --images imgs/ --out train.json --category nucleus
  isda convert labels --labels masks/ --images imgs/ --out train.json --class-maps classes/ --categories cats.json
  (cats.json: {"1": "nucleus", "2": "cell"}; then: isda train --ann train.json --images imgs/ --out runs/mine)""",
}

# ---------------------------------------------------------------------------------------------------
# Each verb's options


def _shapes_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="dataset root (gets train/, val/, annotations/)")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=200)
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)


def _train_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    _dataset_args(p, splits=("train", "val"))
    p.add_argument("--val-ann", help="validation annotation json (with --ann/--images)")
    p.add_argument("--val-images", help="validation image folder (with --ann/--images)")
    p.add_argument("--out", required=True, help="run directory (config.yaml, metrics.jsonl, last.pt, best.pt, curves.png)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--init", help="initial weights: Deformable-DETR (hf/detr/mmdet) or an isda checkpoint")
    p.add_argument("--from-scratch", action="store_true",
                   help="train the backbone from random weights (BatchNorm, nothing frozen; recorded as "
                        "model.from_scratch in the run's config). Without weights (--init or model.backbone_weights) "
                        "a frozen backbone stops training with an error")
    p.add_argument("--max-iters", type=int, help="stop after this many optimizer steps")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, help="isda checkpoint (best.pt / last.pt) or isda export (.onnx)")
    _dataset_args(p, splits=("val",))
    p.add_argument("--results", help="where to write the COCO results JSON (default: next to the weights)")
    p.add_argument("--batch-size", type=int, default=4)
    _inference_args(p)


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, help="isda checkpoint or isda export (.onnx: ONNX Runtime, CPU)")
    p.add_argument("paths", nargs="+", help="image files, folders or globs")
    p.add_argument("--out", default="runs/predict", help="output folder")
    p.add_argument("--score-thr", type=float, default=0.3)
    p.add_argument("--show-reference-points", action="store_true",
                   help="mark each detection's reference point; also write a figure of all queries' points")
    p.add_argument("--show-sampling-points", action="store_true",
                   help="draw where the last decoder layer sampled for the top detections (size = weight); also "
                        "write a figure with one panel per feature level")
    p.add_argument("--tile", type=int, metavar="SIZE",
                   help="large images: predict overlapping SIZE x SIZE windows (each resized like the test "
                        "pipeline, so choose SIZE for the objects to keep a useful size) and merge them")
    p.add_argument("--tile-overlap", type=int, metavar="PX",
                   help="overlap of neighbouring windows (default: SIZE // 4); objects smaller than half of it "
                        "are found exactly once, with their whole mask")
    _inference_args(p)


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, help="isda checkpoint (best.pt / last.pt)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    p.add_argument("--int8", action="store_true",
                   help="also write OUT_int8.onnx: convolutions (backbone, neck, mask features) statically "
                        "quantised with ranges calibrated on --calib-images, transformer linear layers dynamically")
    p.add_argument("--calib-images", metavar="DIR", help="--int8: a folder of images like the ones to segment")
    p.add_argument("--calib-count", type=int, default=32, metavar="N",
                   help="--int8: calibrate on the first N images of --calib-images (sorted by name)")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--data", default="data/shapes", help="where the shapes dataset lives / is generated")
    p.add_argument("--minutes", type=float, default=DEMO_MINUTES, help="training budget in minutes (default: %(default)g)")
    p.add_argument("--device")


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--from", dest="fmt", choices=["hf", "detr", "mmdet"], help="source format (default: detect)")
    _config_args(p)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--coco-classes", action="store_true",
                   help="the source's class head is COCO's 91-id one (hf/detr): keep its 80 COCO rows")


def _convert_labelme_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="folder of labelme JSON files (file_name in the json is relative to it)")
    p.add_argument("--out", required=True, help="the COCO json to write")
    p.add_argument("--labels", help="labelme's labels.txt (one name per line): category ids in its order, every "
                                    "label must be in it (default: the labels found, sorted)")


def _convert_labels_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", required=True, help="folder of instance label images")
    p.add_argument("--images", required=True, help="folder of the images (file_name in the json is relative to it)")
    p.add_argument("--out", required=True, help="the COCO json to write")
    p.add_argument("--class-maps", help="folder of semantic label images (pixel value = category id, 0 = none): "
                                        "each instance takes the majority class under its pixels")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--categories", help='JSON file of category names, e.g. {"1": "nucleus", "2": "cell"} '
                                        "(default: class_<id> for the ids found)")
    g.add_argument("--category", default="object", help="the one category's name without --class-maps")


# ---------------------------------------------------------------------------------------------------
# Options shared by verbs


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


def _inference_args(p: argparse.ArgumentParser) -> None:
    """The verbs that run a trained model (eval, predict): how to run it."""
    p.add_argument("--device")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="bf16: convolutions and matrix products in bfloat16 (autocast; faster on GPUs and on CPUs "
                        "with bfloat16 matrix units such as Intel AMX), the deformable-attention core and the "
                        "ranking in float32; isda checkpoints only (default: %(default)s)")
    p.add_argument("--runtime", choices=("onnxruntime", "openvino"), default="onnxruntime",
                   help="what runs an .onnx --weights file (CPU): ONNX Runtime, or OpenVINO "
                        "(pip install 'isda[openvino]')")


# ---------------------------------------------------------------------------------------------------
# The verbs: (help, options, what runs)

Verb = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], Any]]
VERBS: dict[str, Verb] = {
    "shapes": ("Generate the built-in COCO-format shapes dataset.", _shapes_args, cmd_shapes),
    "train": ("Train ISDA on a COCO-format dataset (works under torchrun).", _train_args, cmd_train),
    "eval": ("Evaluate a checkpoint: COCO mask AP table and a results JSON.", _eval_args, cmd_eval),
    "predict": ("Segment images: overlay PNGs and one COCO results JSON.", _predict_args, cmd_predict),
    "export": ("Export a checkpoint to ONNX: the whole NMS-free model, post-processing included, one graph.",
               _export_args, cmd_export),
    "demo": ("Generate shapes, train the tiny preset on CPU, evaluate, draw pictures.", _demo_args, cmd_demo),
    "convert": ("Convert Deformable-DETR weights (hf / detr / mmdet) to an isda initialisation file "
                "(instance label images to COCO json: isda convert labels).", _convert_args, cmd_convert),
}
# "isda convert labels" and "isda convert labelme" have their own parsers (see main), not sub-commands of "convert".
CONVERT_FORMATS: dict[str, Verb] = {
    "labels": ("Instance label images (PNG/TIFF, 8/16/32-bit, 0 = background, one value per instance) -> a COCO "
               "instance-segmentation json (RLE). A label image is matched to its image by file stem, optionally + "
               "_label, _labels, _mask or _masks.", _convert_labels_args, cmd_convert_labels),
    "labelme": ("labelme's JSON files (polygons, rectangles, circles; shapes sharing a group_id are one instance) "
                "-> a COCO instance-segmentation json (RLE).", _convert_labelme_args, cmd_convert_labelme),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="isda", description="ISDA instance segmentation: train, evaluate, predict.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(VERBS) + "}")
    for name, (help_, add_args, _) in VERBS.items():
        add_args(sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES[name],
                                formatter_class=argparse.RawDescriptionHelpFormatter))
    return p


def build_convert_parser(fmt: str) -> argparse.ArgumentParser:
    """``isda convert labels|labelme``: their own parsers, as ``isda convert SRC DST`` takes positionals."""
    description, add_args, _ = CONVERT_FORMATS[fmt]
    p = argparse.ArgumentParser(prog=f"isda convert {fmt}", description=description,
                                epilog=EXAMPLES[f"convert {fmt}"], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(command=f"convert {fmt}")
    add_args(p)
    return p


# ---------------------------------------------------------------------------------------------------
# Running a verb


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # "convert labels|labelme" before argparse: "convert" alone takes SRC DST, which "labels --labels ..." would fill.
    if argv[:1] == ["convert"] and argv[1:2] and argv[1] in CONVERT_FORMATS:
        args, command = build_convert_parser(argv[1]).parse_args(argv[2:]), CONVERT_FORMATS[argv[1]][2]
    else:
        args = build_parser().parse_args(argv)
        command = VERBS[args.command][2]
    try:
        command(args)
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
    from ..config import ConfigError
    from ..data import DatasetError
    from ..engine import NonFiniteLossError
    from ..fileio import OutputError
    from ..weights import WeightsError

    return isinstance(e, (UserError, ConfigError, DatasetError, WeightsError, OutputError, NonFiniteLossError,
                          FileNotFoundError, FileExistsError, json.JSONDecodeError))
