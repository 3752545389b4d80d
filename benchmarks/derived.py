"""Figures derived from the accuracy runs (seed means, differences), computed once: the benchmark stores them in
its JSON (``sections.accuracy.summary``) for the pages to quote, and the generated page states the same ones."""

from __future__ import annotations

from typing import Any

MODELS = ("isda", "maskrcnn")


def ap(run: dict[str, Any] | None, key: str = "AP") -> float:
    """A run's mask AP (``key``: AP, AP50, APs, ...) on the 0-100 scale; NaN when the run has none."""
    return 100 * ((run or {}).get("ap") or {}).get(key, float("nan"))


def _finished(runs: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    return [r for r in runs if r and r.get("ap")]


def seed_means(acc: dict[str, Any], budget: str, seeds: list[str] | None = None) -> dict[str, Any] | None:
    """ISDA tiny against Mask R-CNN on the test split at ``budget`` (seconds, as the JSON keys it), over the
    ``seeds`` (default: the section's) each model finished: per model the mean AP and AP50 (0-100), the APs in
    seed order, the mean steps; then ``difference`` (mean AP ISDA − Mask R-CNN), ``noise`` (the larger of the two
    models' seed ranges) and ``seeds`` (the fewer of the two counts). None when either model has no run."""
    seeds = [str(s) for s in (acc.get("seeds", []) if seeds is None else seeds)]
    runs = {m: _finished([acc.get(m, {}).get(budget, {}).get(s) for s in seeds]) for m in MODELS}
    if not all(runs.values()):
        return None
    out: dict[str, Any] = {}
    for m, got in runs.items():
        aps = [ap(r) for r in got]
        out[m] = {"mean_ap": sum(aps) / len(aps), "mean_ap50": sum(ap(r, "AP50") for r in got) / len(got),
                  "aps": aps, "mean_steps": sum(r["iterations"] for r in got) / len(got)}
    out["difference"] = out["isda"]["mean_ap"] - out["maskrcnn"]["mean_ap"]
    out["noise"] = max(max(v["aps"]) - min(v["aps"]) for v in (out[m] for m in MODELS))
    out["seeds"] = min(len(v) for v in runs.values())
    return out


def heldout(runs: dict[str, Any]) -> dict[str, Any]:
    """One budget of the held-out family: each finished run's AP and AP50 (0-100, one seed each), and
    ``difference`` (ISDA − Mask R-CNN) where both ran."""
    out: dict[str, Any] = {name: {"ap": ap(r), "ap50": ap(r, "AP50")} for name, r in runs.items() if r and r.get("ap")}
    if "isda" in out and "maskrcnn" in out:
        out["difference"] = out["isda"]["ap"] - out["maskrcnn"]["ap"]
    return out


def accuracy_summary(acc: dict[str, Any]) -> dict[str, Any]:
    """``{"test": {budget: seed_means(...)}, "heldout": {budget: heldout(...)}}`` for every budget measured."""
    test = {b: seed_means(acc, b) for b in sorted({*acc.get("isda", {}), *acc.get("maskrcnn", {})}, key=int)}
    return {"test": {b: v for b, v in test.items() if v is not None},
            "heldout": {b: heldout(r) for b, r in sorted((acc.get("heldout") or {}).items(), key=lambda kv: int(kv[0]))}}
