"""Where a benchmark's figures came from, and what would make them stale.

Every results section a benchmark writes carries ``_meta`` (:func:`meta`): the date, the command that re-runs
it, the load average around it, the git commit of the tree it ran on, and ``depends_on``: named fingerprints
(:func:`fingerprints`) of what its figures depend on. ``python -m benchmarks.figures --check`` compares those
with the current tree: a page that quotes a section whose fingerprints changed is quoting stale figures.

Fingerprint names:

- ``preset:NAME``: the preset's resolved configuration, every field (``{"section.field": value}``). A field
  that changed value makes the figures stale, as does a field removed. A field added since the measurement is
  compared with its class default, the behaviour it was added with (a new switch defaults to off): added at
  that default, the preset still does what was measured; set otherwise in the preset, it does not.
- ``preset:NAME:SECTIONS``: only those sections of it (comma-separated), e.g. ``preset:isda_tiny:model,data`` for
  an inference figure, which neither the losses nor the training recipe change, nor the model's training-only
  switches (``ModelConfig.TRAINING_ONLY``, left out of such a scope).
- ``data:NAME``: the source of a data generator in :data:`DATA` (the images it makes are what was measured on).

A section that decided preset values (the sweep and lever choice behind a preset's defaults) records them in
``_meta.decided`` (``{"section.field": value}``): the preset taking exactly those values is what the section
measured for, not a change that makes it stale. Such a record of a choice is not staled either by the values a later
record of a choice decided (``also_decided`` of :func:`stale`): each difference is a recorded decision.

A section whose every run records what a preset field decided for it (the accuracy section: each run's input size
and its own ``data.fit_sizes`` override, where it set one) lists the field in ``_meta.recorded_per_run``: a change of
that field's default is read from the runs themselves, not from the fingerprint.

A section not measured on a quiet machine (:mod:`benchmarks.quiet`: started above its load line, or beside
other work) is stale from the start: its figures cannot be quoted.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from isda.config import Config, ConfigError, ModelConfig, get_preset

from .quiet import verdict

ROOT = Path(__file__).resolve().parents[1]

# Generated datasets, by the source file that generates them.
DATA = {"shapes": "src/isda/data/shapes.py", "heldout": "benchmarks/heldout_shapes.py"}

# What a section records when its fingerprints at measurement time cannot be known (measured before they were
# recorded, and the inputs changed since or their history does not show): the check treats it as stale.
UNVERIFIED = "unverified"

# Length of a fingerprint: a sha256 prefix, enough to tell versions apart.
DIGITS = 16


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:DIGITS]


def flat(config: dict[str, Any]) -> dict[str, Any]:
    """``Config.to_dict()`` as ``{"section.field": value}``."""
    return {f"{section}.{k}": v for section, fields in config.items() for k, v in fields.items()}


def _training_only(name: str) -> set[str]:
    """The fields a preset fingerprint leaves out: none for the whole preset or a scope with the training sections;
    for a scope without them (``model,data``: a figure of the inference network and its input), the model's
    training-only switches (``ModelConfig.TRAINING_ONLY``), which build nothing that inference runs."""
    scope = name.partition(":")[2].partition(":")[2]
    if name.partition(":")[0] != "preset" or not scope or {"loss", "train"} & set(scope.split(",")):
        return set()
    return {f"model.{f}" for f in ModelConfig.TRAINING_ONLY}


def fingerprint(name: str) -> dict[str, Any] | str:
    """The current fingerprint called ``name``: a preset's fields (``preset:isda_tiny``, or some sections of them:
    ``preset:isda_tiny:model,data``), a data generator's source digest (``data:shapes``); ValueError names an
    unknown one."""
    kind, _, what = name.partition(":")
    if kind == "preset":
        preset, _, scope = what.partition(":")
        try:
            fields = json.loads(json.dumps(get_preset(preset).to_dict()))
        except ConfigError as e:
            raise ValueError(f"unknown fingerprint {name!r}: {e}") from None
        sections = scope.split(",") if scope else list(fields)
        if set(sections) - set(fields):
            raise ValueError(f"unknown fingerprint {name!r}: sections are {', '.join(fields)}")
        return {k: v for k, v in flat({k: v for k, v in fields.items() if k in sections}).items()
                if k not in _training_only(name)}
    if kind == "data" and what in DATA:
        return _digest((ROOT / DATA[what]).read_bytes())
    raise ValueError(f"unknown fingerprint {name!r}: use preset:<preset name>[:<sections>] or "
                     f"data:<{'|'.join(DATA)}>")


def changes(name: str, recorded: Any, now: Any, decisions: Iterable[dict[str, Any]] = (),
            per_run: Iterable[str] = ()) -> list[str]:
    """How fingerprint ``name`` changed since ``recorded``: one phrase per difference (see the module doc); a field
    now at the value one of ``decisions`` records is not one, nor a field in ``per_run`` (recorded by every run)."""
    if not (isinstance(recorded, dict) and isinstance(now, dict)):
        return [] if recorded == now else [f"{name} changed (recorded {recorded}, now {now})"]
    defaults = flat(json.loads(json.dumps(Config().to_dict())))
    decisions = list(decisions)

    def decided(k: str, v: Any) -> bool:
        return any(k in d and d[k] == v for d in decisions)

    skip = set(per_run) | _training_only(name)  # a record from before a field was training-only still has it
    now = {k: v for k, v in now.items() if k not in skip}
    recorded = {k: v for k, v in recorded.items() if k not in skip}
    out = [f"{name}: {k} was {recorded[k]!r}, now {v!r}" for k, v in now.items()
           if k in recorded and recorded[k] != v and not decided(k, v)]
    out += [f"{name}: {k} is {v!r}, not its default {defaults.get(k)!r} (added since)"
            for k, v in now.items() if k not in recorded and v != defaults.get(k) and not decided(k, v)]
    out += [f"{name}: {k} was removed" for k in recorded if k not in now]
    return out


def fingerprints(names: Iterable[str]) -> dict[str, Any]:
    """{name: current fingerprint} for each name, sorted by name."""
    return {name: fingerprint(name) for name in sorted(set(names))}


def commit() -> str:
    """git HEAD (short), with ``+dirty`` when tracked files under src/ or benchmarks/ differ from it; ``unknown``
    outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def meta(command: str, depends_on: Iterable[str], timing: dict[str, Any] | None = None) -> dict[str, Any]:
    """A section's ``_meta``, made when its measurement ends. ``timing``: the record of
    :func:`benchmarks.quiet.measured` around it (a partial one, with only ``load_before``, for a section saved
    part-way); without it, the load average now."""
    load = os.getloadavg()[0]
    timing = dict(timing or {"load_before": load})
    quiet_record = {"other_cpus": timing.get("other_cpus"),
                    **verdict(timing["load_before"], timing.get("other_cpus"))}
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command,
            "load_average_before": round(timing["load_before"], 2),
            "load_average_after": round(timing.get("load_after", load), 2), **quiet_record,
            "commit": commit(), "depends_on": fingerprints(depends_on)}


def stale(section_meta: dict[str, Any] | None, also_decided: dict[str, Any] | None = None) -> list[str]:
    """Why a section's figures are stale: one phrase per fingerprint that changed, is unverified or unknown, or
    that the section records none; empty when it is current. ``also_decided``: the values the other records of a
    choice in its file decided, not changes for a section that is itself such a record (it decided values)."""
    recorded = (section_meta or {}).get("depends_on")
    if not isinstance(recorded, dict):
        return ["it records no _meta.depends_on"]
    reasons = []
    # Measured beside other work: recorded as invalid, or (a section from before that record) started busy.
    quiet_record = verdict(section_meta.get("load_average_before") or 0.0, section_meta.get("other_cpus"))
    if section_meta.get("valid") is False or not quiet_record["valid"]:
        why = section_meta.get("invalid_because") or quiet_record.get("invalid_because")
        reasons.append(f"it was not measured on a quiet machine ({why})")
    for name, value in sorted(recorded.items()):
        if name == UNVERIFIED:
            reasons.append(f"its fingerprints are unverified ({value})")
            continue
        try:
            now = fingerprint(name)
        except ValueError as e:
            reasons.append(str(e))
            continue
        # A record of a choice: a field may sit at its own decision or at a later record's decision of the field.
        decided = section_meta.get("decided")
        reasons += changes(name, value, now, [decided, also_decided or {}] if decided else [],
                           section_meta.get("recorded_per_run") or ())
    return reasons
