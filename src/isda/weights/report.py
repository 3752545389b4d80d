"""What a conversion did, as a table and as the text ``isda convert`` / ``train --init`` print."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .formats import FORMAT_NAMES, Layout


@dataclass
class ConversionReport:
    """What a conversion did. ``loaded``: ISDA key -> the source key(s) it came from; ``unused``: source
    key -> why it was not used; ``left_at_init``: ISDA key -> why it keeps its initialisation."""

    fmt: str
    source: str | None = None
    layout: Layout | None = None
    loaded: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)
    left_at_init: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        src = f" {self.source}" if self.source else ""
        lines = [f"ISDA weights from the {FORMAT_NAMES.get(self.fmt, self.fmt)} checkpoint{src}"]
        groups: dict[str, int] = {}
        for key in self.loaded:
            name = "class head" if key.startswith("head.class_embed.") else key.split(".")[0]
            groups[name] = groups.get(name, 0) + 1
        detail = ", ".join(f"{k} {n}" for k, n in groups.items())
        lines.append(f"  loaded: {len(self.loaded)} tensors" + (f" ({detail})" if detail else ""))
        for title, table in (("left at initialisation", self.left_at_init), ("not used from the checkpoint", self.unused)):
            lines.append(f"  {title}: {len(table)} tensors" + (":" if table else ""))
            for reason, keys in _by_reason(table).items():
                lines.append(f"    {reason}: {_summarize(keys)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _by_reason(table: Mapping[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, reason in table.items():
        out.setdefault(reason, []).append(key)
    return out


def _summarize(keys: list[str], max_patterns: int = 3) -> str:
    """Compact key list: numbers become '*', leaf names merge into {a,b}; many patterns -> common prefix."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", k), []).append(k)
    patterns: dict[str, int] = {}
    for p, members in groups.items():  # keep a number where every key of the pattern has the same one
        segs = [m.split(".") for m in members]
        p = ".".join(s if s != "*" or len({m[i] for m in segs}) > 1 else segs[0][i] for i, s in enumerate(p.split(".")))
        patterns[p] = len(members)
    merged: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for p, n in patterns.items():
        head, _, leaf = p.rpartition(".")
        merged.setdefault(head, []).append(leaf)
        counts[head] = counts.get(head, 0) + n
    if len(merged) > max_patterns:
        parts = [h.split(".") for h in merged]
        common = []
        for segs in zip(*parts):
            if len(set(segs)) != 1:
                break
            common.append(segs[0])
        return f"{'.'.join(common) + '.' if common else ''}* ({len(keys)})"
    out = []
    for head, leaves in merged.items():
        leaf = leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}"
        out.append(f"{head + '.' if head else ''}{leaf} ({counts[head]})")
    return ", ".join(out)
