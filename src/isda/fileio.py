"""Atomic file writes (a reader, or a crash, never sees a half-written file), output folders checked before
any work, and the one-line form of an exception for messages about files."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class OutputError(OSError):
    """An output folder or file cannot be written (one line naming it)."""


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


# The name _temp_path gives: .<name>.<pid>.<8 hex>.tmp
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file next to ``path`` for writing; on success it is synced and renamed over ``path``,
    on failure removed. A unique name opened with "x" (not mkstemp, whose files are private): the
    umask applies as usual."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes only ('w' or 'wb'), got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, mode.replace("w", "x")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create the folder ``path`` if needed and check that a file can be written in it, so that a run fails
    before its work rather than when it saves the result. Raises a one-line OutputError naming ``what``
    (e.g. "--out runs/x") and the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what}: {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = _temp_path(path / "write-check")
        probe.open("x").close()
        probe.unlink()
    except OSError as e:
        reason = e.strerror or first_line(e)
        raise OutputError(f"{what}: cannot write in {path} ({reason})") from None
    return path


def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """:func:`check_writable_dir` for the folder of the file ``path``, which must not be a folder itself."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what}: {path} is a folder, not a file")
    check_writable_dir(path.parent, what)
    return path


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files that :func:`atomic_open` left in ``folder`` when its process was killed (kill -9
    mid-write: up to a whole checkpoint each); files of a process still running are kept. Returns the removed
    paths."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in Path(folder).iterdir():
            found = _TEMP_NAME.match(entry.name)
            if found and not _pid_alive(int(found.group(1))) and entry.is_file():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): for one-line errors."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
