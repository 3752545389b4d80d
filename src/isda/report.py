"""One static HTML page per run (train, eval, demo): what was run, how well it did, its pictures.

Standard library only, so the page opens anywhere: no scripts, no stylesheets to fetch, pictures linked
by relative path (they sit next to the page, as a run directory is moved or copied as a whole). Rewritten
atomically at every validation, so a page open during training is never half-written.
"""

from __future__ import annotations

import datetime
import html
import os
import platform
import shlex
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .engine.evaluation import STAT_NAMES
from .fileio import atomic_write_text
from .visualize import read_jsonl, validation_points

__all__ = ["RUN_PICTURES", "command_line", "versions", "write_run_report"]

# The pictures a run directory may hold, in the order a reader wants them, with what they show.
RUN_PICTURES: tuple[tuple[str, str], ...] = (
    ("curves.png", "Training loss and validation mask AP."),
    ("predictions.png", "Validation images: ground truth (left) beside the prediction (right)."),
    ("val_predictions.png", "Validation images at the last validation: ground truth (left) beside the prediction "
                            "(right)."),
    ("sampling_points.png", "Where the last decoder layer's deformable attention sampled for the best "
                            "detections, one panel per feature level; dot area is the attention weight."),
    ("reference_points.png", "Every query's reference point, coloured by its best class score."),
)
# Files of a run worth a link, when present.
RUN_FILES: tuple[str, ...] = ("config.yaml", "metrics.jsonl", "results_val.json", "best.pt", "last.pt")

STYLE = """
body { font-family: DejaVu Sans, Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1700px; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
th { background: #f3f3f3; }
td.name, th.name { text-align: left; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.9em; }
figure { margin: 0 0 2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
"""


def versions() -> dict[str, str]:
    """Versions of what produced the run: python, torch, torchvision, isda, and the platform."""
    import torch
    import torchvision

    from . import __version__

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "isda": __version__}
    try:  # the installed distribution's version, which differs from __version__ only in a broken install
        out["isda"] = metadata.version("isda")
    except metadata.PackageNotFoundError:
        pass
    out["platform"] = platform.platform()
    return out


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as the user would type it again (``isda train ...``, not a path to a console script)."""
    argv = list(sys.argv if argv is None else argv)
    prog = Path(argv[0]).name if argv else "isda"
    if prog in ("isda", "__main__.py"):
        prog = "isda"
    return shlex.join([prog, *argv[1:]])


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _ap(value: Any) -> str:
    return "n/a" if not isinstance(value, (int, float)) or value < 0 else f"{100.0 * value:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], name_columns: int = 1) -> str:
    def row(cells: Sequence[Any], tag: str) -> str:
        name = ' class="name"'
        return "<tr>" + "".join(f"<{tag}{name if i < name_columns else ''}>{_e(c)}</{tag}>"
                                for i, c in enumerate(cells)) + "</tr>"
    return "<table>\n" + row(header, "th") + "\n" + "\n".join(row(r, "td") for r in rows) + "\n</table>"


def _link(path: Path, base: Path) -> str:
    """A relative URL from the page's folder (a run directory stays browsable when moved)."""
    return quote(Path(os.path.relpath(path, base)).as_posix())


def write_run_report(run_dir: str | os.PathLike, *, title: str, path: str | os.PathLike | None = None,
                     stats: Mapping[str, float] | None = None, per_category: Mapping[str, float] | None = None,
                     pictures: Sequence[tuple[str | os.PathLike, str]] | None = None,
                     files: Sequence[str | os.PathLike] | None = None, config_text: str | None = None,
                     summary: Mapping[str, Any] | None = None, command: str | None = None) -> Path:
    """Write ``run_dir/report.html`` (or ``path``) and return its path.

    Everything defaults to what the run directory holds: ``stats`` / ``per_category`` (0-1 scale) to the
    last validation row of ``metrics.jsonl``, ``pictures`` ((file, caption) pairs) to those of
    :data:`RUN_PICTURES` present, ``files`` to those of ``RUN_FILES`` present, ``config_text`` to
    ``config.yaml``; ``command`` to this process's command line. ``summary``: extra (name, value) rows.
    """
    run_dir = Path(run_dir)
    path = Path(path) if path is not None else run_dir / "report.html"
    base = path.parent
    rows = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    history = validation_points([r for r in rows if r.get("type") == "val" and isinstance(r.get("AP"), (int, float))])
    if stats is None and history:
        stats = history[-1][1]
        per_category = per_category if per_category is not None else stats.get("per_category")
    if pictures is None:
        pictures = [(run_dir / name, caption) for name, caption in RUN_PICTURES if (run_dir / name).is_file()]
    if files is None:
        files = [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    if config_text is None and (run_dir / "config.yaml").is_file():
        config_text = (run_dir / "config.yaml").read_text()
    train_rows = [r for r in rows if r.get("type") == "train"]
    info: dict[str, Any] = {}
    if train_rows:
        info["training steps logged up to"] = train_rows[-1].get("iter", "?")
        info["last training loss"] = f"{train_rows[-1].get('loss', float('nan')):.4f}"
    info.update(summary or {})
    info["written"] = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")

    parts = [f"<h1>{_e(title)}</h1>", "<h2>Command</h2>", f"<pre>{_e(command or command_line())}</pre>",
             "<h2>Summary</h2>", _table(["", ""], list(info.items()))]
    parts.append("<h2>Mask AP (COCO, 0-100)</h2>")
    if stats:
        parts.append(_table(list(STAT_NAMES), [[_ap(stats.get(k)) for k in STAT_NAMES]], name_columns=0))
    else:
        parts.append("<p>No evaluation yet.</p>")
    if per_category:
        parts += ["<h2>Per-category mask AP</h2>",
                  _table(["category", "AP"], [[name, _ap(ap)] for name, ap in per_category.items()])]
    if len(history) > 1:
        x_name = "iteration" if all(isinstance(r.get("iter"), (int, float)) for _, r in history) else "epoch"
        parts += ["<h2>Validations</h2>",
                  _table([x_name, "AP", "AP50", "AP75"], [[x, *(_ap(r.get(k)) for k in ("AP", "AP50", "AP75"))]
                                                         for x, r in history])]
    if pictures:
        parts.append("<h2>Pictures</h2>")
        for picture, caption in pictures:
            src = _e(_link(Path(picture), base))
            parts.append(f'<figure><a href="{src}"><img src="{src}" alt="{_e(caption)}"></a>'
                         f"<figcaption>{_e(Path(picture).name)}: {_e(caption)}</figcaption></figure>")
    if config_text:
        parts += ["<h2>Configuration</h2>", f"<pre>{_e(config_text)}</pre>"]
    if files:
        parts += ["<h2>Files</h2>", "<ul>"]
        parts += [f'<li><a href="{_e(_link(Path(f), base))}">{_e(Path(f).name)}</a></li>' for f in files]
        parts.append("</ul>")
    parts += ["<h2>Versions</h2>", _table(["", ""], list(versions().items()))]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")
    atomic_write_text(path, page)
    return path
