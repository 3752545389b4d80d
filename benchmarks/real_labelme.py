"""Real labelme annotations: the instance-segmentation example that ships in labelme's source package on PyPI.

    python -m benchmarks.real_labelme fetch     # once (make real-data): the example's files into .cache/real/labelme

Three PASCAL VOC photos annotated in labelme (``examples/instance_segmentation/data_annotated``: polygons, a person
in two parts joined by a ``group_id``, ``__ignore__`` regions), its ``labels.txt``, and the COCO file that labelme's
own converter made of them (``data_dataset_coco/annotations.json``): the reference ``isda convert labelme`` is
checked against (tests/test_real_data.py). ``fetch`` downloads the source archive with ``pip download --no-deps``
(nothing is installed) and extracts those files.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from .real_nuclei import CACHE

SDIST = "labelme==6.3.1"
EXAMPLE = "examples/instance_segmentation"
FOLDER = CACHE / "labelme"


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["fetch"])
    p.parse_args(argv)
    print(f"labelme example in {fetch()}")


if __name__ == "__main__":
    main()
