"""Figures derived from the accuracy runs (seed means, differences), computed once: the benchmark stores them in
its JSON (``sections.accuracy.summary``) for the pages to quote, and the generated page states the same ones."""

from __future__ import annotations

import time
from typing import Any

MODELS = ("isda", "maskrcnn")
# Two runs that finished this close ran in one group of the same invocation: side by side.
SIDE_BY_SIDE_S = 120.0
# Training seconds of the speed probe that opens every accuracy invocation that trains after the sweep: both models'
# recipes side by side, as the runs are. Runs merged from invocations on machines of another speed are not a fair
# pair whatever the CPU's name says; Mask R-CNN's recipe does not change with ISDA's preset, so its rate compares
# the machines (:func:`pairing`).
PROBE_S = 60.0
# Mask R-CNN's speed-probe rates of two invocations within this fraction of each other: the same machine speed
# (two machines of one CPU name took 1700 and 1120 ISDA steps in the same 8 minutes).
SPEED_TOLERANCE = 0.05
# The goal of an ISDA − Mask R-CNN comparison: the paper's margin over Mask R-CNN on COCO (AP), beyond the seed noise.
GOAL_MARGIN = 2.6


def ap(run: dict[str, Any] | None, key: str = "AP") -> float:
    """A run's mask AP (``key``: AP, AP50, APs, ...) on the 0-100 scale; NaN when the run has none."""
    return 100 * ((run or {}).get("ap") or {}).get(key, float("nan"))


def finished(runs: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The runs that finished with an AP (a run not made or stopped is None or has none)."""
    return [r for r in runs if r and r.get("ap")]


def means(got: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean AP and AP50 (0-100), the APs in order, mean steps and the count of finished runs ``got``; the mean
    class-agnostic AP (every category as one: what wrong labels cost) where every run measured it."""
    aps = [ap(r) for r in got]
    out = {"ap_mean": sum(aps) / len(aps), "ap50_mean": sum(ap(r, "AP50") for r in got) / len(got), "aps": aps,
           "steps_mean": sum(r.get("iterations", 0) for r in got) / len(got), "seeds": len(got)}
    if all(r.get("ap_class_agnostic") for r in got):
        out["agnostic_mean"] = sum(100 * r["ap_class_agnostic"]["AP"] for r in got) / len(got)
    return out


def _finished_at(run: dict[str, Any]) -> float | None:
    return time.mktime(time.strptime(run["date"], "%Y-%m-%d %H:%M:%S")) if run.get("date") else None


def _probe_rate(run: dict[str, Any]) -> float | None:
    """Mask R-CNN's rate in the speed probe of the run's invocation; None without one, or where the probe ran
    beside other work (its quiet record says invalid)."""
    probe = run.get("speed_probe") or {}
    if (probe.get("quiet") or {}).get("valid") is False:
        return None
    return (probe.get("steps_per_s") or {}).get("maskrcnn")


def pairing(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """How fair a comparison's (ISDA run, Mask R-CNN run) pairs of one seed each are: ``side_by_side`` when every
    pair finished within SIDE_BY_SIDE_S of each other (one group of one invocation: the machine's speed and load hit
    both alike); otherwise ``speed_difference``, the largest relative difference between the Mask R-CNN speed-probe
    rates of the two runs' invocations (None where a run has no valid probe), and ``fair`` when it is within
    SPEED_TOLERANCE. ``hours_apart``: the largest gap between a pair's finishing times (None where a run did not
    record its own)."""
    times = [(_finished_at(i), _finished_at(m)) for i, m in pairs]
    apart = None if any(a is None or b is None for a, b in times) else max(abs(a - b) for a, b in times)
    side = apart is not None and apart <= SIDE_BY_SIDE_S
    rates = [(_probe_rate(i), _probe_rate(m)) for i, m in pairs]
    diff = None if any(a is None or b is None for a, b in rates) else max(abs(a / b - 1) for a, b in rates)
    return {"side_by_side": side, "hours_apart": None if apart is None else apart / 3600, "speed_difference": diff,
            "fair": side or (diff is not None and diff <= SPEED_TOLERANCE)}


def matched(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The seeds (keys of two ``{seed: result}`` maps) that both finished with an AP, in ``a``'s order: a
    difference compares each entry on the same seeds, not a seed one ran in another invocation that the other
    did not."""
    return [s for s, x in a.items() if x and x.get("ap") and (y := b.get(s)) and y.get("ap")]


def judge(difference: float, noise: float, seeds: int) -> dict[str, str]:
    """What a difference a − b over ``seeds`` seeds with seed ``noise`` says: ``verdict`` ``tie`` (within the noise),
    ``ahead`` or ``behind`` (a against b, beyond it), ``one seed`` (the noise is not known: no verdict); ``goal``
    ``met`` where a is ahead by GOAL_MARGIN or more, else ``not met``."""
    if seeds < 2:
        return {"verdict": "one seed", "goal": "not met"}
    verdict = "tie" if abs(difference) <= noise else "ahead" if difference > 0 else "behind"
    return {"verdict": verdict, "goal": "met" if verdict == "ahead" and difference >= GOAL_MARGIN else "not met"}


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """Two entries' ``{seed: result}`` maps over the seeds both finished (:func:`matched`): ``difference`` (mean AP of
    ``a`` − of ``b``), ``seeds`` (how many), ``noise`` (the larger of the two seed ranges there), ``verdict`` and
    ``goal`` (:func:`judge`) and ``pairing`` (:func:`pairing` of those seeds' runs). None when they share no finished
    seed."""
    seeds = matched(a, b)
    if not seeds:
        return None
    got = [means([side[s] for s in seeds]) for side in (a, b)]
    difference = got[0]["ap_mean"] - got[1]["ap_mean"]
    noise = max(max(g["aps"]) - min(g["aps"]) for g in got)
    return {"difference": difference, "seeds": len(seeds), "noise": noise, **judge(difference, noise, len(seeds)),
            "pairing": pairing([(a[s], b[s]) for s in seeds])}


def seed_means(acc: dict[str, Any], budget: str, seeds: list[str] | None = None) -> dict[str, Any] | None:
    """ISDA tiny against Mask R-CNN on the test split at ``budget`` (seconds, as the JSON keys it), over those of the
    ``seeds`` (default: the section's) that both models finished (:func:`matched`): per model the mean AP and AP50
    (0-100), the APs in seed order, the mean steps and the seed count; then ``difference`` (mean AP ISDA − Mask
    R-CNN), ``noise`` (the larger of the two models' seed ranges), ``seeds`` and ``pairing`` (:func:`compare`).
    None when the two share no finished seed."""
    seeds = [str(s) for s in (acc.get("seeds", []) if seeds is None else seeds)]
    runs = {m: {s: acc.get(m, {}).get(budget, {}).get(s) for s in seeds} for m in MODELS}
    both = matched(*runs.values())
    if not both:
        return None
    out: dict[str, Any] = {m: means([got[s] for s in both]) for m, got in runs.items()}
    return {**out, **compare(*runs.values())}


def heldout(runs: dict[str, Any]) -> dict[str, Any]:
    """One budget of the held-out family (``{run name: {seed: result}}``): per run name its means over the seeds
    it finished (:func:`means`); ``noise`` (the largest seed range of any entry); each comparison over the seeds its
    two entries both finished (:func:`compare`): each ISDA entry's ``difference`` against Mask R-CNN, ISDA's
    ``difference_fit`` against Mask R-CNN with data.fit_sizes (``maskrcnn_fit``) and ``fit_sizes_difference``
    (ISDA with data.fit_sizes − without) where both ran, each with its seed count and seed noise there
    (``..._seeds``, ``..._noise``), the comparisons against Mask R-CNN with their :func:`judge` (``..._verdict``,
    ``..._goal``) and :func:`pairing` (``pairing``, ``pairing_fit``)."""
    out: dict[str, Any] = {name: means(got) for name, seeds in runs.items() if (got := finished(list(seeds.values())))}
    for a, b, key, pair_key in [*((n, "maskrcnn", "difference", "pairing") for n in ("isda", "isda_no_fit")),
                                ("isda", "maskrcnn_fit", "difference_fit", "pairing_fit")]:
        if a in out and b in out and (c := compare(runs[a], runs[b])) is not None:
            out[a].update({key: c["difference"], f"{key}_seeds": c["seeds"], f"{key}_noise": c["noise"],
                           f"{key}_verdict": c["verdict"], f"{key}_goal": c["goal"], pair_key: c["pairing"]})
    if out:
        out["noise"] = max(max(v["aps"]) - min(v["aps"]) for v in out.values())
    if "isda" in out and "isda_no_fit" in out and (c := compare(runs["isda"], runs["isda_no_fit"])) is not None:
        out.update({"fit_sizes_difference": c["difference"], "fit_sizes_difference_seeds": c["seeds"],
                    "fit_sizes_difference_noise": c["noise"]})
    return out


def variant(entry: dict[str, Any]) -> dict[str, Any]:
    """An ablation or lever: per budget, its means over the seeds it ran (seed 0 under ``runs``, the others under
    ``seeds``), as :func:`seed_means` gives them per model."""
    per_seed = [entry.get("runs") or {}, *(entry.get("seeds") or {}).values()]
    budgets = sorted({b for runs in per_seed for b in runs}, key=int)
    out = {b: finished([runs.get(b) for runs in per_seed]) for b in budgets}
    return {b: means(got) for b, got in out.items() if got}


def lever_sections(acc: dict[str, Any]) -> list[str]:
    """The accuracy section's lever comparisons: ``tune_levers`` and ``heldout_levers``, and the same with generic
    speed-ups on for every entry (``tune_levers+bf16``, ...), in that order."""
    return sorted((k for k in acc if k.partition("+")[0] in ("tune_levers", "heldout_levers") and acc[k]),
                  key=lambda k: (not k.startswith("tune"), k))


def speedup_sections(acc: dict[str, Any]) -> list[str]:
    """The accuracy section's generic speed-up comparisons: ``tune_speedups``, and the same on a recipe that already
    has some speed-ups (``tune_speedups+bf16``: the others on top of it)."""
    return sorted(k for k in acc if k.partition("+")[0] == "tune_speedups" and acc[k])


def lever_budgets(tune_levers: dict[str, Any]) -> list[str]:
    """The budgets (seconds, as the JSON keys them) at which any lever entry ran, in order."""
    return sorted({b for e in tune_levers.values() for b in e.get("runs", {})}, key=int)


def lever_choice(tune_levers: dict[str, Any], budget: str) -> dict[str, Any]:
    """The levers' tune results at ``budget`` (seconds, as a key) and the winner by the rule fixed before the runs:
    the best mean AP over the seeds; among the entries within the seed noise of the best (half the largest
    spread between two seeds of one entry, at least 0.5 AP), the one with the most steps (the cheapest per step)."""
    rows = {}
    for name, entry in tune_levers.items():
        runs = [r for r in entry.get("runs", {}).get(budget, {}).values() if r.get("ap")]
        if runs:
            aps = [100 * r["ap"]["AP"] for r in runs]
            rows[name] = {"aps": aps, "mean": sum(aps) / len(aps), "steps": sum(r["iterations"] for r in runs) / len(runs),
                          "overrides": entry.get("overrides", {})}
    if not rows:
        return {"rows": {}, "winner": None, "noise": None}
    noise = max(0.5, max((max(r["aps"]) - min(r["aps"])) / 2 for r in rows.values()))
    best = max(r["mean"] for r in rows.values())
    winner = max((n for n, r in rows.items() if r["mean"] >= best - noise), key=lambda n: rows[n]["steps"])
    return {"rows": rows, "winner": winner, "noise": noise}


def accuracy_summary(acc: dict[str, Any]) -> dict[str, Any]:
    """Every derived figure of the accuracy section: ``test`` (:func:`seed_means` per budget), ``heldout``
    (:func:`heldout` per budget), ``levers`` and ``ablations`` (:func:`variant` per name), each of
    :func:`lever_sections` (:func:`lever_choice` per budget),
    each of :func:`speedup_sections` (:func:`lever_choice` per model and budget)."""
    test = {b: seed_means(acc, b) for b in sorted({*acc.get("isda", {}), *acc.get("maskrcnn", {})}, key=int)}
    return {"test": {b: v for b, v in test.items() if v is not None},
            "heldout": {b: heldout(r) for b, r in sorted((acc.get("heldout") or {}).items(), key=lambda kv: int(kv[0]))},
            **{group: {name: variant(e) for name, e in (acc.get(group) or {}).items()} for group in ("levers", "ablations")},
            **{section: {b: lever_choice(acc[section], b) for b in lever_budgets(acc[section])}
               for section in lever_sections(acc)},
            **{section: {model: {b: lever_choice(entries, b) for b in lever_budgets(entries)}
                         for model, entries in acc[section].items()} for section in speedup_sections(acc)}}


def choice_records(secs: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of a choice among a results JSON's sections (those whose ``_meta`` records the preset values
    they ``decided``), oldest first."""
    found = [s for s in secs.values() if isinstance(s, dict) and (s.get("_meta") or {}).get("decided")]
    return sorted(found, key=lambda s: s["_meta"].get("date", ""))
