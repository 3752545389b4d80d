"""The shell and Python examples of README.md and docs/**/*.md run as written.

How a page is run (one test per page, ``test_page_snippets[<page>]``):

- Executed: fenced blocks tagged ``bash``, ``sh`` or ``python``. Every other fence (``text``, ``yaml``, an
  untagged one) is never executed, so command output and generated listings go in ``text`` blocks.
- The blocks of one page run top to bottom in one temporary working directory, prepared once per page with
  ``data/shapes`` (``isda shapes data/shapes --num-train 16 --num-val 4 --size 64``), ``train.json`` +
  ``train/`` and ``val.json`` + ``val/`` (copies of its splits), ``photos/`` (two of its images) and
  ``.cache`` (a link to the checkout's real-data cache, where it exists).
- Shell blocks run with ``bash -e -o pipefail``, one command per line (a line ending in ``\\`` continues on
  the next; ``#`` comments are dropped). ``isda``, ``python`` and ``.venv/bin/python`` resolve to this
  interpreter (shims in the folder's ``.venv/bin``, first on PATH) and the package is this checkout's.
  Lines starting with a prefix in ``NOT_EXECUTED`` (``pip install``, ``make``) are shown, not run: the test
  environment is already set up.
- Commands are made toy-sized by ``REWRITES``, visible in the command line the failure message shows:
  ``isda shapes`` / ``train`` / ``demo`` get flags appended (the last value of a flag or ``--set`` field wins:
  ``TRAIN`` is two steps of batch 2 at 64 px with one validation), and ``--preset isda_r50_coco`` becomes
  ``--preset isda_tiny`` in ``isda train``.
- Python blocks run in a fresh interpreter in the same directory and environment.
- A block that cannot run here (``torchrun``, COCO paths, a GPU, a download) gets
  ``<!-- snippet: skip (reason) -->`` on the line directly before its opening fence; it is reported as
  skipped with the reason (``test_skipped_snippet[<page>:<line>]``). A skip marker without a reason, or
  not directly before an executed block, fails the page.
- A failing block fails the page's test with the page, the block's first line and its output's tail.

``ISDA_DOCS_ROOT`` points the test at another checkout's pages (the code under test stays this one).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS_ROOT = Path(os.environ.get("ISDA_DOCS_ROOT", REPO)).resolve()
LANGUAGES = {"bash": "shell", "sh": "shell", "python": "python"}
NOT_EXECUTED = {  # command prefix -> why it is shown but not run
    ("pip", "install"): "the test environment is already installed",
    ("python", "-m", "pip", "install"): "the test environment is already installed",
    ("make",): "make targets create a virtual environment or run the suite and the long benchmarks",
}
SHAPES = ["--num-train", "16", "--num-val", "4", "--size", "64"]
# Two steps of batch 2 at the toy images' own 64 px, one validation.
TRAIN = ["--set", "train.max_steps=2", "--set", "train.time_budget_s=0", "--set", "train.evals_per_run=1",
         "--set", "train.batch_size=2", "--set", "train.num_workers=0", "--set", "data.train_short_sides=[64]",
         "--set", "data.test_short_side=64"]
REWRITES = {"shapes": SHAPES, "train": TRAIN, "demo": ["--minutes", "0.05"]}  # isda subcommand -> appended
PRESETS = {"isda_r50_coco": "isda_tiny"}  # isda train: preset -> the one it runs as here
BLOCK_TIMEOUT_S = 300
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
MARKER = re.compile(r"<!--\s*snippet:\s*skip\b(.*?)-->")
REASON = re.compile(r"^\s*\((.*\S.*)\)\s*$")


class SnippetError(Exception):
    """A page that cannot run: a failing block or a malformed skip marker."""


@dataclass
class Block:
    page: str  # relative to the docs root
    line: int  # of the opening fence, 1-based
    kind: str  # shell | python
    code: str
    skip: str | None = None  # the reason, for a block marked skip


def page_paths(root: Path) -> list[Path]:
    pages = [root / "README.md"] + sorted((root / "docs").rglob("*.md"))
    return [p for p in pages if p.is_file()]


def parse_page(path: Path, name: str) -> list[Block]:
    """The executed blocks of a markdown page; SnippetError for a malformed skip marker."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    markers: dict[int, str] = {}  # line index -> reason
    for i, line in enumerate(lines):
        if m := MARKER.search(line):
            reason = REASON.match(m.group(1))
            if reason is None:
                raise SnippetError(f"{name}:{i + 1}: a skip marker needs a reason: <!-- snippet: skip (why) -->")
            markers[i] = reason.group(1).strip()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, lang, start = len(m.group(1)), m.group(2).lower(), i
        i += 1
        body = []
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][indent:] if not lines[i][:indent].strip() else lines[i].lstrip())
            i += 1
        i += 1
        marked = start - 1 in markers
        if lang in LANGUAGES:
            blocks.append(Block(name, start + 1, LANGUAGES[lang], "\n".join(body) + "\n",
                                markers.pop(start - 1) if marked else None))
    for i in markers:
        raise SnippetError(f"{name}:{i + 1}: a skip marker must be on the line directly before a "
                           f"```bash, ```sh or ```python block")
    return blocks


def _strip_comment(line: str) -> str:
    """The line without a trailing ``# comment`` (a ``#`` outside quotes, at the start or after a space)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def shell_commands(code: str) -> list[str]:
    """One command per line, backslash continuations joined, comments and blank lines dropped."""
    commands, pending = [], ""
    for raw in code.splitlines():
        line = raw.strip() if pending else raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        command = _strip_comment(pending + line).strip()
        pending = ""
        if command:
            commands.append(command)
    if pending.strip():
        commands.append(_strip_comment(pending).strip())
    return commands


def not_executed(command: str) -> str | None:
    """Why the command is shown but not run, or None."""
    words = command.split()
    for prefix, why in NOT_EXECUTED.items():
        if tuple(words[:len(prefix)]) == prefix:
            return why
    return None


def rewrite(command: str) -> str:
    """The toy-sized command: REWRITES' flags appended to isda shapes / train / demo, PRESETS swapped."""
    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: bash will say so
        return command
    at = 1 if words[:1] == ["isda"] else 3 if words[:3] == ["python", "-m", "isda"] else None
    if at is None or len(words) <= at or words[at] not in REWRITES:
        return command
    if words[at] == "train":
        command = re.sub(r"(--preset[ =])(\w+)", lambda m: m.group(1) + PRESETS.get(m.group(2), m.group(2)), command)
    return f"{command} {shlex.join(REWRITES[words[at]])}"


def shell_script(block: Block) -> str:
    """The bash script of a block: each command echoed to stderr before it runs."""
    script = []
    for command in shell_commands(block.code):
        why = not_executed(command)
        if why:
            script.append(f"echo {shlex.quote(f'# not executed ({why}): {command}')} >&2")
            continue
        command = rewrite(command)
        script += [f"echo {shlex.quote(f'$ {command}')} >&2", command]
    return "\n".join(script) + "\n"


def environment(shim: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{shim}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update({"MPLBACKEND": "Agg", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.pop("ISDA_DEBUG", None)
    return env


def make_shim(folder: Path) -> Path:
    """``isda`` and ``python`` on PATH, both this interpreter."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, args in (("isda", f'"{sys.executable}" -m isda'), ("python", f'"{sys.executable}"'),
                       ("python3", f'"{sys.executable}"')):
        path = folder / name
        path.write_text(f'#!/bin/sh\nexec {args} "$@"\n')
        path.chmod(0o755)
    return folder


def run_block(block: Block, cwd: Path, env: dict[str, str]) -> None:
    """Run one block; SnippetError with the page, the line and the output's tail when it fails."""
    if block.kind == "shell":
        argv = ["bash", "-e", "-o", "pipefail", "-c", shell_script(block)]
    else:
        argv = [sys.executable, "-c", block.code]
    # Its own process group, so that a timeout also ends the commands the block started.
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise SnippetError(f"{block.page}:{block.line}: {block.kind} block ran past {BLOCK_TIMEOUT_S} s") from e
    if proc.returncode != 0:
        tail = (stdout[-1500:] + "\n--- stderr ---\n" + stderr[-3000:]).strip()
        raise SnippetError(f"{block.page}:{block.line}: {block.kind} block failed (exit {proc.returncode})\n{tail}")


def run_page(path: Path, name: str, workdir: Path) -> list[Block]:
    """Run a page's executed blocks in order in ``workdir``; returns the skipped ones."""
    blocks = parse_page(path, name)
    env = environment(make_shim(workdir / ".venv" / "bin"))
    for block in blocks:
        if block.skip is None:
            run_block(block, workdir, env)
    return [b for b in blocks if b.skip is not None]


def _pages() -> list[str]:
    return [p.relative_to(DOCS_ROOT).as_posix() for p in page_paths(DOCS_ROOT)]


def _skipped() -> list[Block]:
    out = []
    for name in _pages():
        try:
            out += [b for b in parse_page(DOCS_ROOT / name, name) if b.skip is not None]
        except SnippetError:
            pass  # the page's own test reports it
    return out


@pytest.fixture(scope="module")
def shapes_data(module_dir: Path) -> Path:
    root = module_dir / "shapes"
    subprocess.run([sys.executable, "-m", "isda", "shapes", str(root), *SHAPES], check=True, capture_output=True,
                   env=environment(make_shim(module_dir / "bin")))
    return root


@pytest.fixture
def workdir(tmp_path: Path, shapes_data: Path) -> Path:
    """A page's working directory: data/shapes, train.json + train/, val.json + val/, photos/, .cache."""
    work = tmp_path / "work"
    shutil.copytree(shapes_data, work / "data" / "shapes")
    for split in ("train", "val"):
        shutil.copy(shapes_data / "annotations" / f"instances_{split}.json", work / f"{split}.json")
        shutil.copytree(shapes_data / split, work / split)
    (work / "photos").mkdir()
    for image in sorted((shapes_data / "val").iterdir())[:2]:
        shutil.copy(image, work / "photos" / image.name)
    if (REPO / ".cache").exists():
        (work / ".cache").symlink_to((REPO / ".cache").resolve())
    return work


@pytest.mark.parametrize("page", _pages())
def test_page_snippets(page: str, workdir: Path) -> None:
    try:
        run_page(DOCS_ROOT / page, page, workdir)
    except SnippetError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.mark.parametrize("block", _skipped(), ids=lambda b: f"{b.page}:{b.line}")
def test_skipped_snippet(block: Block) -> None:
    pytest.skip(f"{block.page}:{block.line}: {block.skip}")


# The harness itself, on temporary pages.

def _page(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "page.md"
    path.write_text(text)
    return path


def test_harness_runs_blocks_in_order_and_skips_what_it_should(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    page = _page(tmp_path, "\n".join([
        "```bash", "pip install isda  # not executed", "make test", "echo one \\", "  two > out.txt  # a comment",
        "```", "```text", "false", "```", "<!-- snippet: skip (needs a GPU) -->", "```bash", "false", "```",
        "```python", "from pathlib import Path", "assert Path('out.txt').read_text() == 'one two\\n'", "```",
        "```sh", ".venv/bin/python -c 'import isda' && isda --help > help.txt", "```", ""]))
    skipped = run_page(page, "page.md", work)
    assert [(b.line, b.skip) for b in skipped] == [(11, "needs a GPU")]
    assert (work / "out.txt").read_text() == "one two\n" and "usage: isda" in (work / "help.txt").read_text()


def test_harness_fails_a_failing_block_with_page_line_and_stderr(tmp_path: Path) -> None:
    page = _page(tmp_path, "intro\n\n```sh\necho fine\necho 'it broke' >&2\nexit 3\necho never\n```\n")
    with pytest.raises(SnippetError) as e:
        run_page(page, "page.md", tmp_path)
    assert str(e.value).startswith("page.md:3: shell block failed (exit 3)") and "it broke" in str(e.value)
    page = _page(tmp_path, "```python\nraise SystemExit('python broke')\n```\n")
    with pytest.raises(SnippetError, match=r"(?s)page.md:1: python block failed \(exit 1\).*python broke"):
        run_page(page, "page.md", tmp_path)


@pytest.mark.parametrize("text", ["<!-- snippet: skip -->\n```bash\nfalse\n```\n",
                                  "<!-- snippet: skip () -->\n```bash\nfalse\n```\n",
                                  "<!-- snippet: skip (why) -->\n\n```bash\nfalse\n```\n",
                                  "<!-- snippet: skip (why) -->\n```text\nfalse\n```\n"])
def test_harness_rejects_a_malformed_skip_marker(tmp_path: Path, text: str) -> None:
    with pytest.raises(SnippetError, match="page.md:1: a skip marker"):
        run_page(_page(tmp_path, text), "page.md", tmp_path)


def test_commands_become_toy_sized() -> None:
    assert rewrite("isda train --preset isda_r50_coco --data d --out r") == \
        "isda train --preset isda_tiny --data d --out r " + shlex.join(TRAIN)
    assert rewrite("python -m isda demo") == "python -m isda demo --minutes 0.05"
    assert rewrite("isda shapes data/shapes") == "isda shapes data/shapes " + shlex.join(SHAPES)
    assert rewrite("isda eval --weights runs/x/best.pt --ann val.json --images val/") == \
        "isda eval --weights runs/x/best.pt --ann val.json --images val/"
    assert shell_commands("a \\\n  --b 'c # d'  # e\n\n# f\n") == ["a --b 'c # d'"]
