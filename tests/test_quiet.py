"""benchmarks.quiet: a timed section waits for the machine to settle and is invalid beside other work."""

from __future__ import annotations

import time

import pytest

from benchmarks import provenance, quiet


def test_settle_waits_until_the_load_is_at_the_line(monkeypatch: pytest.MonkeyPatch) -> None:
    readings = iter([2.0, 1.7, 1.2, 0.1])
    monkeypatch.setattr(quiet, "load", lambda: next(readings))
    monkeypatch.setattr(quiet.time, "sleep", lambda s: None)
    said: list[str] = []
    assert quiet.settle(max_load=1.5, log=said.append) == 1.2
    assert said == ["waiting for the load average (2.00) to settle to 1.5"]


def test_settle_gives_up_after_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quiet, "load", lambda: 3.0)
    assert quiet.settle(timeout_s=0) == 3.0


def test_other_work_is_the_machine_busy_time_not_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """10 s of section, the machine busy 10 CPU-s, 4 of them ours: 0.6 CPUs of other work, too many."""
    busy, own, clock = iter([100.0, 110.0]), iter([5.0, 9.0]), iter([0.0, 10.0])
    monkeypatch.setattr(quiet, "_busy_cpu_seconds", lambda: next(busy))
    monkeypatch.setattr(quiet, "_own_cpu_seconds", lambda: next(own))
    monkeypatch.setattr(quiet.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(quiet, "load", lambda: 0.4)
    with quiet.measured(settle_first=False) as record:
        assert record == {"load_before": 0.4}  # known inside the section, for a part-way save
    assert record["other_cpus"] == pytest.approx(0.6) and record["valid"] is False
    assert record["invalid_because"] == "0.60 CPUs of other work"
    assert quiet.verdict(0.4, 0.1) == {"valid": True}
    assert quiet.verdict(1.8, None) == {"valid": False, "invalid_because": "started at load 1.80"}


def test_the_machine_busy_time_includes_ours() -> None:
    """/proc/stat counts this process's CPU time (so subtracting it leaves the others')."""
    if quiet._busy_cpu_seconds() is None:
        pytest.skip("no /proc/stat here")
    busy0, own0 = quiet._busy_cpu_seconds(), quiet._own_cpu_seconds()
    end = time.process_time() + 0.5
    while time.process_time() < end:
        pass
    assert quiet._busy_cpu_seconds() - busy0 >= 0.8 * (quiet._own_cpu_seconds() - own0)


def test_a_section_measured_beside_other_work_is_stale() -> None:
    busy = provenance.meta("python -m benchmarks.toy", [], {"load_before": 0.3, "load_after": 2.0, "other_cpus": 0.7})
    assert busy["valid"] is False and busy["other_cpus"] == 0.7
    assert provenance.stale(busy) == ["it was not measured on a quiet machine (0.70 CPUs of other work)"]
    # a section from before the other-work record: its starting load alone
    assert provenance.stale({"depends_on": {}, "load_average_before": 1.83}) == [
        "it was not measured on a quiet machine (started at load 1.83)"]
    quiet_meta = provenance.meta("python -m benchmarks.toy", [], {"load_before": 0.3, "load_after": 2.0,
                                                                   "other_cpus": 0.02})
    assert quiet_meta["valid"] is True and provenance.stale(quiet_meta) == []
