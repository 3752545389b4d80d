"""How the page writes numbers: image sizes, times, the measurement line under a section, mask AP."""

from __future__ import annotations

from typing import Any


def image_size(sec: dict[str, Any], default: str = "800x1216") -> str:
    return "x".join(map(str, sec["size"])) if sec.get("size") else default


def seconds(x: float) -> str:
    return f"{x:.3f} s" if x >= 0.1 else f"{x * 1e3:.1f} ms"


def millis(x: float) -> str:
    return f"{x * 1e3:.1f}"


def measured(sec: dict[str, Any]) -> str:
    m = sec.get("_meta", {})
    if not m:
        return ""
    on = f" on {m['cpu']}" if m.get("cpu") else ""
    return (f"<sub>Measured {m.get('date')}{on}, {m.get('threads')} threads, load average {m.get('load_average_before')} "
            f"before / {m.get('load_average_after')} after, {m.get('seconds')} s; `{m.get('command')}`.</sub>\n")


def ap(res: dict[str, Any] | None, key: str = "AP") -> float:
    return 100 * ((res or {}).get("ap") or {}).get(key, float("nan"))
