"""Timings on a quiet machine: wait for it to settle, then count the CPU time everything else used.

The 1-minute load average alone cannot say whether a measurement ran beside other work: it counts the
measurement's own threads (a 2-thread run lifts it towards 2 within a minute) and decays with a one-minute time
constant (a run started right after another starts above any line). So a timed section (:func:`measured`) first
waits until the load average has settled to :data:`MAX_LOAD`, then counts the CPU time the rest of the machine
used while it ran: the busy time in ``/proc/stat`` minus this process's and its finished children's. The section
is valid when it started settled and the others used at most :data:`MAX_OTHER_CPUS` CPUs on average; a figure
from an invalid section is not quoted (``benchmarks.figures`` treats its ``_meta`` as stale).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

MAX_LOAD = 1.5  # 1-minute load average a timed section may start at
MAX_OTHER_CPUS = 0.25  # CPUs' worth of other work (average over the section) a timed section tolerates
SETTLE_TIMEOUT_S = 900.0


def load() -> float:
    return round(os.getloadavg()[0], 2)


def settle(max_load: float = MAX_LOAD, timeout_s: float = SETTLE_TIMEOUT_S, poll_s: float = 5.0,
           log: Callable[[str], None] | None = None) -> float:
    """Wait until the 1-minute load average is at most ``max_load`` (or ``timeout_s`` passed); the last reading."""
    deadline = time.monotonic() + timeout_s
    now = load()
    if now > max_load and log is not None:
        log(f"waiting for the load average ({now:.2f}) to settle to {max_load}")
    while now > max_load and time.monotonic() < deadline:
        time.sleep(poll_s)
        now = load()
    return now


def _busy_cpu_seconds() -> float | None:
    """CPU-seconds the whole machine spent busy since boot (``/proc/stat``), None where there is no such file."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def verdict(load_before: float, other_cpus: float | None) -> dict[str, Any]:
    """Whether a section with these readings counts, and if not, the reason the page prints instead."""
    why = []
    if load_before > MAX_LOAD:
        why.append(f"started at load {load_before:.2f}")
    if other_cpus is not None and other_cpus > MAX_OTHER_CPUS:
        why.append(f"{other_cpus:.2f} CPUs of other work")
    return {"valid": not why, **({"invalid_because": ", ".join(why)} if why else {})}


@contextmanager
def measured(settle_first: bool = True, log: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """Time a section: settle first (unless ``settle_first`` is False), then fill the yielded dict when the block
    ends with ``load_before``, ``load_after``, ``other_cpus`` (None where ``/proc/stat`` is missing), ``valid``
    and, when invalid, ``invalid_because``. Children count as the section's own once they have been waited for."""
    before = settle(log=log) if settle_first else load()
    record: dict[str, Any] = {"load_before": before}  # known now: a section saved part-way quotes it
    busy0, own0, t0 = _busy_cpu_seconds(), _own_cpu_seconds(), time.monotonic()
    yield record
    busy1, own1, elapsed = _busy_cpu_seconds(), _own_cpu_seconds(), max(time.monotonic() - t0, 1e-6)
    other = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / elapsed
    record.update({"load_before": before, "load_after": load(),
                   "other_cpus": None if other is None else round(other, 3), **verdict(before, other)})


def worst(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One record for sections measured one after another: the highest starting load and other work."""
    others = [r["other_cpus"] for r in records if r.get("other_cpus") is not None]
    return {"load_before": max((r["load_before"] for r in records), default=load()),
            "load_after": records[-1]["load_after"] if records else load(),
            "other_cpus": max(others) if others else None}


def quiet_note(record: dict[str, Any]) -> str:
    """The page's small print for a timed section: its load averages and the other work beside it."""
    other = record.get("other_cpus")
    return (f"load average {record.get('load_before')} before, {record.get('load_after')} after"
            + ("" if other is None else f", other work {other:.2f} CPUs"))
