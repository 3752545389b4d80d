"""Measured numbers on the doc pages, checked against the JSON their benchmarks wrote.

    python -m benchmarks.figures --check [PAGES...]   # list every disagreement, exit 1 if any
    python -m benchmarks.figures --write [PAGES...]   # rewrite quoted numbers and generated pages from the JSON

Pages (default: README.md and docs/**/*.md, relative to the repository root) quote a measured number with a marker:

    <!-- fig docs/benchmarks.json sections.inference.ratio_latency .2f -->0.87<!-- /fig -->

``<!-- fig SOURCE KEYPATH [FORMAT] -->TEXT<!-- /fig -->`` on one line: SOURCE a JSON file relative to the repository
root, KEYPATH its keys joined by dots (an integer indexes a list; ``%20`` and ``%2E`` write a space or a dot inside a
key), FORMAT a Python format spec (default ``g`` for numbers). TEXT must be the value so formatted. A derived figure
(a mean over seeds, a difference) is computed by the benchmark and stored in its JSON, never in a marker.

The pages in :data:`GENERATED` are rendered whole from their JSON: the check renders them again and compares.
Either way, the JSON section quoted (the innermost object on the key path that has a ``_meta``; a generated page:
every section of its JSON) must be current: its ``_meta.depends_on`` fingerprints equal to the tree's
(:mod:`benchmarks.provenance`), or the figures describe code or data that has changed since. ``--write`` cannot
fix that (re-run the command the message names); for a generated page it rewrites the page's text, not its charts
(the page's own command draws those).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import re
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from isda.fileio import atomic_write_text

from . import provenance

ROOT = provenance.ROOT
MARKER = re.compile(r"<!-- fig (?P<source>\S+) (?P<key>\S+)(?: (?P<spec>\S+))? -->(?P<text>.*?)<!-- /fig -->")


class FigureError(ValueError):
    """A marker that cannot be resolved: unknown source or key, or a value that cannot be formatted."""


@dataclass(frozen=True)
class Generated:
    """A page rendered whole: ``render(data, page)`` returns its text from ``source``'s JSON (``data``; None when
    ``source`` is None: a page generated from code, not from measurements); ``command`` writes it."""

    source: str | None
    render: Callable[[Any, Path], str]
    command: str


def _render_benchmarks(data: dict[str, Any], page: Path) -> str:
    from .report import render

    # render() writes the page and its charts: into a scratch folder, of which only the page is compared.
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / page.name
        render(data, out)
        return out.read_text()


def _render_onnx(data: dict[str, Any], page: Path) -> str:
    from .bench_onnx import render

    return render(data) + "\n"


def _render_real_data(data: dict[str, Any], page: Path) -> str:
    from .real_nuclei import render

    return render(data, page)


def _render_faults(data: None, page: Path) -> str:
    tests = ROOT / "tests"
    sys.path.insert(0, str(tests))  # the corpus imports its helpers as the test runner does
    try:
        spec = importlib.util.spec_from_file_location("fault_corpus", tests / "test_fault_corpus.py")
        module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(tests))
    return module.render()


GENERATED: dict[str, Generated] = {
    "docs/benchmarks.md": Generated("docs/benchmarks.json", _render_benchmarks, "python -m benchmarks.run --render"),
    "docs/onnx.md": Generated("docs/onnx.json", _render_onnx, "python -m benchmarks.bench_onnx (see docs/onnx.json _meta)"),
    "docs/real_data.md": Generated("docs/real_data.json", _render_real_data,
                                   "python -m benchmarks.real_nuclei render --page docs/real_data.md"),
    "docs/faults.md": Generated(None, _render_faults, "python tests/test_fault_corpus.py"),
}


def default_pages(root: Path = ROOT) -> list[str]:
    """README.md and every page under docs/, relative to ``root``."""
    pages = [p for p in [root / "README.md", *sorted((root / "docs").rglob("*.md"))] if p.is_file()]
    return [p.relative_to(root).as_posix() for p in pages]


def lookup(data: Any, keypath: str) -> tuple[Any, str, dict[str, Any] | None]:
    """The value at ``keypath`` and the section that records it: (value, the section's key path, its ``_meta``),
    the section being the innermost object on the path with a ``_meta`` ("" and None when none has)."""
    node, done = data, []
    section = ("", data.get("_meta") if isinstance(data, dict) else None)
    for part in keypath.split("."):
        key = unquote(part)
        where = ".".join(done) or "the top level"
        if isinstance(node, list) and re.fullmatch(r"-?\d+", key) and -len(node) <= int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            raise FigureError(f"no key {key!r} under {where}" + (
                f" (keys: {', '.join(sorted(map(str, node))[:12])})" if isinstance(node, dict) else ""))
        done.append(part)
        if isinstance(node, dict) and "_meta" in node:
            section = (".".join(done), node["_meta"])
    return node, *section


def show(value: Any, spec: str | None) -> str:
    """``value`` as a page quotes it: ``format(value, spec)``, spec ``g`` for numbers by default."""
    if isinstance(value, (dict, list)):
        raise FigureError(f"is a {type(value).__name__}, not a figure")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        return format(value, spec if spec is not None else "g" if number else "")
    except (TypeError, ValueError) as e:
        raise FigureError(f"cannot format {value!r} with {spec!r}: {e}") from None


def sections(data: Any, path: str = "") -> Iterable[tuple[str, dict[str, Any]]]:
    """Every (key path, ``_meta``) of a results JSON: the objects with a ``_meta``, lists not entered."""
    if isinstance(data, dict):
        if "_meta" in data:
            yield path, data["_meta"]
        for key, value in data.items():
            if key != "_meta":
                yield from sections(value, f"{path}.{key}" if path else key)


class _Sources:
    """The JSON files pages quote, each read once."""

    def __init__(self, root: Path):
        self.root, self.cache = root, {}

    def __call__(self, source: str) -> Any:
        if source not in self.cache:
            path = self.root / source
            if not path.is_file():
                raise FigureError(f"{source} not found")
            try:
                self.cache[source] = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise FigureError(f"{source} is not valid JSON: {e}") from None
        return self.cache[source]


def decisions(data: Any) -> dict[str, Any]:
    """Every value the records of a choice in a results JSON decided (their ``_meta.decided``), the later
    record's where two decided one field."""
    records = sorted((m for _, m in sections(data) if m.get("decided")), key=lambda m: m.get("date", ""))
    return {k: v for m in records for k, v in m["decided"].items()}


def _stale(where: str, source: str, section: str, section_meta: dict[str, Any] | None, command: str,
           data: Any = None) -> list[str]:
    # Only a record of a choice (it decided values) is excused by the others' decisions.
    reasons = provenance.stale(section_meta, decisions(data) if (section_meta or {}).get("decided") else None)
    if not reasons:
        return []
    rerun = (section_meta or {}).get("command") or command
    return [f"{where}: quotes {source} section {section or '(top level)'!r}, whose figures are stale: "
            f"{'; '.join(reasons)}; re-run: {rerun}"]


def _markers(page: str, text: str, sources: _Sources, write: bool) -> tuple[list[str], str]:
    """Problems of the page's markers, and its text with every resolvable marker's TEXT set from the JSON."""
    problems: list[str] = []
    stale_seen: set[tuple[str, str]] = set()

    def one(match: re.Match) -> str:
        line = text.count("\n", 0, match.start()) + 1
        source, key, spec, quoted = match["source"], match["key"], match["spec"], match["text"]
        try:
            value, section, section_meta = lookup(sources(source), key)
            figure = show(value, spec)
        except FigureError as e:
            problems.append(f"{page}:{line}: {source} {key}: {e}")
            return match[0]
        if (source, section) not in stale_seen:  # one line per section quoted, at its first quote
            stale_seen.add((source, section))
            problems.extend(_stale(f"{page}:{line}", source, section, section_meta, f"the benchmark that wrote {source}",
                                   sources(source)))
        if figure == quoted:
            return match[0]
        if not write:
            problems.append(f"{page}:{line}: quotes {quoted}, {source} {key} is {figure}")
            return match[0]
        return match[0][: match.start("text") - match.start()] + figure + match[0][match.end("text") - match.start():]

    new = MARKER.sub(one, text)
    starts = {m.start() for m in MARKER.finditer(text)}
    for m in re.finditer(r"<!--\s*/?fig\b", text):  # a marker the pattern does not read would go unchecked
        if m.start() not in starts and not text.startswith("<!-- /fig -->", m.start()):
            problems.append(f"{page}:{text.count(chr(10), 0, m.start()) + 1}: malformed figure marker (expected "
                            "<!-- fig SOURCE KEYPATH [FORMAT] -->TEXT<!-- /fig --> on one line)")
    return problems, new


def _generated(page: str, text: str, gen: Generated, sources: _Sources, root: Path, write: bool) -> list[str]:
    problems: list[str] = []
    try:
        data = sources(gen.source) if gen.source else None
    except FigureError as e:
        return [f"{page}: generated from {e}"]
    found = list(sections(data)) or ([("", None)] if gen.source else [])  # a JSON without any _meta: stale
    for section, section_meta in found:
        problems += _stale(page, gen.source, section, section_meta, gen.command, data)
    try:
        rendered = gen.render(data, Path(page))
    except Exception as e:  # a JSON its renderer no longer reads: one line, not a traceback
        return problems + [f"{page}: `{gen.command}` cannot render it" + (f" from {gen.source}" if gen.source else "")
                           + f": {type(e).__name__}: {e}"]
    if rendered != text:
        if write:
            atomic_write_text(root / page, rendered)
        else:
            diff = next((i for i, (a, b) in enumerate(zip(text.splitlines(), rendered.splitlines()), 1) if a != b),
                        min(len(text.splitlines()), len(rendered.splitlines())) + 1)
            changed = "".join(difflib.unified_diff(text.splitlines(True), rendered.splitlines(True), "committed",
                                                   "rendered", n=0))
            problems.append(f"{page}:{diff}: differs from what `{gen.command}` renders"
                            + (f" from {gen.source}" if gen.source else "") + " (hand-edited or stale):\n"
                            + "\n".join("    " + line for line in changed.splitlines()[:12]))
    return problems


def run(pages: Iterable[str] | None = None, write: bool = False, root: Path = ROOT,
        generated: dict[str, Generated] | None = None) -> list[str]:
    """Check (or with ``write``, first rewrite) ``pages`` (paths relative to ``root``; default: README.md and
    docs/**/*.md); returns the problems left, one message each, starting ``PAGE:LINE:`` (``PAGE:`` where the
    whole page is concerned)."""
    generated = GENERATED if generated is None else generated
    sources = _Sources(root)
    problems: list[str] = []
    for page in (default_pages(root) if pages is None else [Path(p).as_posix() for p in pages]):
        path = root / page
        if not path.is_file():
            problems.append(f"{page}: no such page")
            continue
        text = path.read_text()
        if page in generated:
            problems += _generated(page, text, generated[page], sources, root, write)
            continue
        found, new = _markers(page, text, sources, write)
        problems += found
        if new != text:
            atomic_write_text(path, new)
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="list every disagreement; exit 1 if any")
    mode.add_argument("--write", action="store_true", help="rewrite quoted figures and generated pages from the JSON")
    p.add_argument("pages", nargs="*", help="pages relative to the repository root (default: README.md, docs/**/*.md)")
    args = p.parse_args(argv)
    problems = run(args.pages or None, write=args.write)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s)" + (" left after writing" if args.write else ""), file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
