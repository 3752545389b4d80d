"""Parent side of :mod:`benchmarks.worker`: start workers, alternate their runs, collect results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .common import summary

ROOT = Path(__file__).resolve().parents[1]


class Worker:
    """One model in its own fresh Python process (so its peak RSS is its own)."""

    def __init__(self, name: str, args: list[str], src: Path | None = None) -> None:
        """``src``: the folder to import isda from (default: this tree's ``src``; e.g. an older revision's)."""
        self.name = name
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(src or ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.command = [sys.executable, "-m", "benchmarks.worker", *args]
        self.proc = subprocess.Popen(self.command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self._ready: dict[str, Any] | None = None

    @property
    def ready(self) -> dict[str, Any]:
        """The worker's first reply (model built); waits for it."""
        if self._ready is None:
            self._ready = self._read()
        return self._ready

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"benchmark worker {self.name} exited with code {code}: {' '.join(self.command)}")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"benchmark worker {self.name}: {out['error']}")
        return out

    def ask(self, command: str) -> dict[str, Any]:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def compare(specs: dict[str, list[str]], repeats: int, warmup: int = 1, components: int = 0,
            sources: Mapping[str, Path] | None = None, log=print) -> dict[str, Any]:
    """Start one worker per spec (importing isda from ``sources[name]`` where given), then ``warmup`` untimed and ``repeats`` timed runs, alternating the
    workers run by run; optionally ``components`` breakdown runs each (also alternating). Returns, per
    worker: timing summary, peak RSS (GiB), median component times, the command line."""
    workers: dict[str, Worker] = {}
    try:
        for name, args in specs.items():  # started together: the builds overlap, the timed runs do not
            workers[name] = Worker(name, args, (sources or {}).get(name))
        for name, w in workers.items():
            log(f"  {name}: built in {w.ready['build_s']:.1f} s")
        for _ in range(warmup):
            for w in workers.values():
                w.ask("run")
        times: dict[str, list[float]] = {name: [] for name in workers}
        detections: dict[str, Any] = {}
        for i in range(repeats):
            for name, w in workers.items():
                reply = w.ask("run")
                times[name].append(reply["seconds"])
                detections[name] = reply.get("detections")
            log("  run %d: %s" % (i + 1, ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items())))
        comps: dict[str, list[dict[str, float]]] = {name: [] for name in workers}
        for _ in range(components):
            for name, w in workers.items():
                comps[name].append(w.ask("components")["components"])
        out = {}
        for name, w in workers.items():
            out[name] = {"time": summary(times[name]), "peak_rss_gib": w.ask("stats")["peak_rss_gib"],
                         "command": " ".join(["python", *w.command[1:]])}
            if detections.get(name) is not None:
                out[name]["detections"] = detections[name]
            if comps[name]:
                keys = comps[name][0].keys()
                out[name]["components"] = {k: summary([c[k] for c in comps[name]])["median"] for k in keys}
        return out
    finally:
        for w in workers.values():
            w.close()
