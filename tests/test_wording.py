"""The repository's text talks about the code, not about how it was made.

Every tracked text file (code, tests, docs, packaging, CI) is searched for: working sessions, issue
references ("issue 7", "#17"), engineers, paths of the machine it was built on, and measurements dated
against the history ("measured before ...", "not re-measured"). Technical uses of the same words
(an ONNX Runtime session, a pytest fixture's scope, a CSS colour) are allowed by ``ALLOWED``, each with
its reason; an allowed span is removed from the line before the forbidden patterns are searched.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".txt", ".toml", ".yaml", ".cff", ".cfg"}
NAMES = {"Makefile", ".ci/run"}
SELF = "tests/test_wording.py"  # it spells out the patterns it looks for

FORBIDDEN = {
    "session": re.compile(r"\bsessions?\b", re.IGNORECASE),
    "issue reference": re.compile(r"\bissues?\s+#?\d+|(?<![\w$&#])#\d+\b", re.IGNORECASE),
    "engineer": re.compile(r"\bengineers?\b", re.IGNORECASE),
    "build-machine path": re.compile(r"(?<![\w.])/(?:work|root)/|/tmp/pytest"),
    "dated measurement": re.compile(r"\bmeasured before\b|\bnot re-measured\b", re.IGNORECASE),
}

# (pattern, reason): spans removed from a line before FORBIDDEN is searched.
ALLOWED = [
    (r"ONNX Runtime session", "onnxruntime's InferenceSession, named in prose"),
    (r"\bort session", "onnxruntime's InferenceSession, abbreviated"),
    (r"\.session\b", "the attribute that holds an onnxruntime InferenceSession"),
    (r"scope=[\"']session[\"']", "a pytest fixture scope"),
    (r"== \"Session\"", "an event category of ONNX Runtime's profiler"),
    (r"#[0-9a-fA-F]{3}(?:[0-9a-fA-F]{3})?;", "a CSS colour in the HTML report's style sheet"),
    (r"measured before (?:they were\b|fingerprints)",
     "benchmarks.provenance's state of a result whose inputs' fingerprints were not recorded with it"),
]
_ALLOWED = re.compile("|".join(f"(?:{pattern})" for pattern, _ in ALLOWED))


def tracked_text_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
    return sorted(name for name in out.splitlines()
                  if (Path(name).suffix in SUFFIXES or name in NAMES) and name != SELF)


def find_hits(text: str) -> list[tuple[int, str, str]]:
    """(line number, kind, matched text) for every forbidden phrase outside the allowed spans."""
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        scrubbed = _ALLOWED.sub(" ", line)
        for kind, pattern in FORBIDDEN.items():
            hits += [(number, kind, match.group(0)) for match in pattern.finditer(scrubbed)]
    return hits


@pytest.mark.parametrize("text, kinds", [
    ("Fixed in this session.", ["session"]),
    ("Two sessions ago", ["session"]),
    ("the lever of issue 7", ["issue reference"]),
    ("see #17 for details", ["issue reference"]),
    ("three other engineers' runs", ["engineer"]),
    ("ln -s /work/main/.cache .cache", ["build-machine path"]),
    ("kept in /tmp/pytest-of-root/x", ["build-machine path"]),
    ("AP 25.9, measured before the new loss and not re-measured", ["dated measurement"] * 2),
    ("self.session = ort.InferenceSession(path)", []),
    ("the ONNX Runtime session with the model's interface", []),
    ('@pytest.fixture(scope="session")', []),
    ("color: #222; }", []),
    ('{"unverified": "measured before fingerprints"}', []),
    ("ROOT/annotations/instances_train2017.json, $# args, x[#] = 1", []),
])
def test_patterns(text: str, kinds: list[str]) -> None:
    assert [kind for _, kind, _ in find_hits(text)] == kinds


def test_tracked_files_talk_about_the_code() -> None:
    files = tracked_text_files(ROOT)
    assert "pyproject.toml" in files and "Makefile" in files
    found = [f"{name}:{number}: {kind}: {match!r}"
             for name in files if (ROOT / name).is_file()
             for number, kind, match in find_hits((ROOT / name).read_text(encoding="utf-8", errors="replace"))]
    assert not found, "say what the code does instead:\n" + "\n".join(found)
