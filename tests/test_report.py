"""The run report: valid HTML, every referenced file present, the numbers, the command and the versions."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

from isda.report import command_line, write_run_report
from isda.visualize import save_png

# Elements HTML defines as having no end tag.
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Checker(HTMLParser):
    """Checks nesting (every start tag closed in order) and collects src/href links and the text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self.errors: list[str] = []
        self.doctype = False

    def handle_decl(self, decl: str) -> None:
        self.doctype = self.doctype or decl.lower() == "doctype html"

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if tag == "img" and not dict(attrs).get("alt"):
            self.errors.append("img without alt text")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def assert_valid_report(path: Path, *needles: str) -> str:
    """Parse ``path``; assert it is well-formed, self-contained (every link a file next to it) and holds
    each of ``needles`` (text or a linked file name). Returns its text."""
    checker = _Checker()
    checker.feed(path.read_text(encoding="utf-8"))
    checker.close()
    assert checker.doctype, "no <!DOCTYPE html>"
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    for link in checker.links:
        url = urlparse(link)
        assert not url.scheme and not url.netloc, f"{link}: not a relative link"
        assert (path.parent / unquote(url.path)).is_file(), f"{link} referenced but missing"
    text = " ".join(checker.text)
    for needle in needles:
        assert needle in text or any(link.endswith(needle) for link in checker.links), needle
    for name in ("python", "torch", "torchvision", "isda"):
        assert name in text
    return text


def test_report_of_a_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run & <co>"  # a name that needs escaping in HTML and in URLs
    run.mkdir()
    rows = [{"type": "train", "epoch": 0, "iter": i, "loss": 2.0 / i} for i in range(1, 11)]
    rows += [{"type": "val", "epoch": 0, "iter": 5, "AP": 0.1, "AP50": 0.2, "AP75": 0.05, "APs": -1.0,
              "APm": 0.1, "APl": 0.12, "per_category": {"circle": 0.2, "star <5>": 0.0}},
             {"type": "val", "epoch": 0, "iter": 10, "AP": 0.234, "AP50": 0.4, "AP75": 0.2, "APs": -1.0,
              "APm": 0.2, "APl": 0.3, "per_category": {"circle": 0.4, "star <5>": 0.068}}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (run / "config.yaml").write_text("model:\n  num_queries: 100\n")
    for name in ("curves.png", "val_predictions.png"):
        save_png(torch.zeros(3, 8, 8, dtype=torch.uint8), run / name)
    path = write_run_report(run, title="run <x>", command="isda train --out 'runs/a b'")
    assert path == run / "report.html"
    text = assert_valid_report(path, "curves.png", "val_predictions.png", "config.yaml", "metrics.jsonl",
                               "isda train --out 'runs/a b'", "num_queries: 100", "star <5>", "run <x>")
    assert "23.4" in text and "6.8" in text and "n/a" in text  # last validation, 0-100 scale; APs absent
    assert "reference_points.png" not in text  # only pictures that exist


def test_report_elsewhere_with_given_numbers_and_pictures(tmp_path: Path) -> None:
    save_png(torch.zeros(3, 8, 8, dtype=torch.uint8), tmp_path / "pics" / "a.png")
    path = write_run_report(tmp_path / "empty", path=tmp_path / "out" / "r.html", title="eval",
                            stats={"AP": 0.5, "AP50": 0.6, "AP75": 0.5, "APs": 0.1, "APm": 0.2, "APl": 0.3},
                            pictures=[(tmp_path / "pics" / "a.png", "first")], files=[], summary={"images": 3})
    text = assert_valid_report(path, "a.png", "50.0")
    assert "images" in text


def test_command_line_is_what_a_user_types() -> None:
    assert command_line(["/venv/bin/isda", "train", "--out", "a b"]) == "isda train --out 'a b'"
    assert command_line(["/x/isda/__main__.py", "demo"]) == "isda demo"
