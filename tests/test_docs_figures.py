"""Measured figures on the doc pages: every page agrees with the JSON its benchmark wrote and quotes no stale
section (benchmarks/figures.py), and the machinery itself on temporary pages."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest

from benchmarks import demo_page, derived, figures, provenance, quiet
from isda import config

CURRENT = {"preset:isda_tiny": provenance.fingerprint("preset:isda_tiny")}


def test_every_page_agrees_with_its_json() -> None:
    problems = figures.run()
    assert not problems, "\n".join(problems) + "\nfix: python -m benchmarks.figures --write (or re-run the benchmark)"


# ---- the machinery on temporary pages ---------------------------------------------------------------------------

def _repo(tmp_path: Path, depends_on: dict | None = None, page: str = "") -> Path:
    meta = {"command": "python -m benchmarks.toy", "depends_on": CURRENT if depends_on is None else depends_on}
    data = {"sec": {"_meta": meta, "x": 0.8731, "n": 2551, "runs": [1.5, 2.5], "a b": {"c.d": 3}}, "top": 7}
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "toy.json").write_text(json.dumps(data))
    (tmp_path / "docs" / "page.md").write_text(page)
    return tmp_path


def _fig(key: str, text: str, spec: str = "") -> str:
    return f"<!-- fig docs/toy.json {key}{' ' + spec if spec else ''} -->{text}<!-- /fig -->"


def test_matching_markers_pass(tmp_path: Path) -> None:
    page = (f"# Toy\n\nratio {_fig('sec.x', '0.87', '.2f')}, {_fig('sec.n', '2,551', ',')} steps, "
            f"{_fig('sec.x', '0.8731')} by default\n| {_fig('sec.runs.1', '2.5')} | {_fig('sec.a%20b.c%2Ed', '3')} |\n")
    root = _repo(tmp_path, page=page)
    assert figures.run(["docs/page.md"], root=root, generated={}) == []
    assert figures.default_pages(root) == ["docs/page.md"]


def test_wrong_number_fails_naming_page_and_line(tmp_path: Path) -> None:
    root = _repo(tmp_path, page=f"# Toy\n\nfine {_fig('sec.x', '0.87', '.2f')}\nwrong {_fig('sec.x', '0.91', '.2f')}\n")
    assert figures.run(["docs/page.md"], root=root, generated={}) == [
        "docs/page.md:4: quotes 0.91, docs/toy.json sec.x is 0.87"]


@pytest.mark.parametrize("marker, expected", [
    (_fig("sec.y", "1"), r"^docs/page\.md:2: docs/toy\.json sec\.y: no key 'y' under sec \(keys: .*x"),
    (_fig("sec.runs.5", "1"), r"^docs/page\.md:2: docs/toy\.json sec\.runs\.5: no key '5' under sec\.runs$"),
    ("<!-- fig docs/none.json sec.x -->1<!-- /fig -->", r"^docs/page\.md:2: docs/none\.json sec\.x: docs/none\.json not found$"),
    (_fig("sec", "1"), r"^docs/page\.md:2: docs/toy\.json sec: is a dict, not a figure$"),
    (_fig("sec.x", "1", ".2q"), r"^docs/page\.md:2: docs/toy\.json sec\.x: cannot format 0\.8731 with '\.2q'"),
    ("<!-- fig docs/toy.json -->1<!-- /fig -->", r"^docs/page\.md:2: malformed figure marker"),
    ("<!--fig docs/toy.json sec.x-->0.8731<!-- /fig -->", r"^docs/page\.md:2: malformed figure marker"),
    ("<!-- fig docs/toy.json sec.x -->0.8731\n<!-- /fig -->", r"^docs/page\.md:2: malformed figure marker"),
])
def test_unresolvable_marker_is_one_line(tmp_path: Path, marker: str, expected: str) -> None:
    root = _repo(tmp_path, page=f"# Toy\n{marker}\n")
    (problem,) = figures.run(["docs/page.md"], root=root, generated={})
    assert "\n" not in problem and re.search(expected, problem), problem


@pytest.mark.parametrize("depends_on, reason", [
    ({"preset:isda_tiny": "0" * 16}, "preset:isda_tiny changed (recorded 0000000000000000, now "),
    ({"unverified": "measured before fingerprints"}, "unverified (measured before fingerprints)"),
    ({"preset:no_such": "x"}, "unknown fingerprint 'preset:no_such'"),
])
def test_stale_section_fails(tmp_path: Path, depends_on: dict, reason: str) -> None:
    page = f"# Toy\n{_fig('sec.x', '0.87', '.2f')}\n{_fig('sec.n', '2551')}\n{_fig('top', '7')}\n"
    root = _repo(tmp_path, depends_on=depends_on, page=page)
    problems = figures.run(["docs/page.md"], root=root, generated={})
    # one line for the stale section (at its first quote), one for the top level that records no _meta at all
    assert len(problems) == 2, problems
    assert problems[0].startswith("docs/page.md:2: quotes docs/toy.json section 'sec', whose figures are stale: ")
    assert reason in problems[0] and problems[0].endswith("re-run: python -m benchmarks.toy")
    assert problems[1].startswith("docs/page.md:4: quotes docs/toy.json section '(top level)'")
    assert "records no _meta.depends_on" in problems[1]


def _toy_generated() -> dict[str, figures.Generated]:
    return {"docs/gen.md": figures.Generated("docs/toy.json", lambda data, page: f"x = {data['sec']['x']:.2f}\n",
                                             "python -m benchmarks.toy --render")}


def test_generated_page_is_rendered_and_compared(tmp_path: Path) -> None:
    root = _repo(tmp_path)
    gen = _toy_generated()
    (root / "docs" / "gen.md").write_text("x = 0.87\n")
    assert figures.run(["docs/gen.md"], root=root, generated=gen) == []
    (root / "docs" / "gen.md").write_text("x = 0.90\n")
    (problem,) = figures.run(["docs/gen.md"], root=root, generated=gen)
    assert problem.startswith("docs/gen.md:1: differs from what `python -m benchmarks.toy --render` renders from "
                              "docs/toy.json") and "-x = 0.90" in problem and "+x = 0.87" in problem
    assert figures.run(["docs/gen.md"], write=True, root=root, generated=gen) == []
    assert (root / "docs" / "gen.md").read_text() == "x = 0.87\n"


def test_generated_page_that_cannot_be_rendered_is_one_line(tmp_path: Path) -> None:
    root = _repo(tmp_path)
    (root / "docs" / "gen.md").write_text("x = 0.87\n")
    gen = {"docs/gen.md": figures.Generated("docs/toy.json", lambda data, page: data["sec"]["gone"], "make gen")}
    assert figures.run(["docs/gen.md"], root=root, generated=gen) == [
        "docs/gen.md: `make gen` cannot render it from docs/toy.json: KeyError: 'gone'"]


def test_generated_page_of_a_stale_json_fails(tmp_path: Path) -> None:
    root = _repo(tmp_path, depends_on={"preset:isda_tiny": "0" * 16})
    (root / "docs" / "gen.md").write_text("x = 0.87\n")
    (problem,) = figures.run(["docs/gen.md"], root=root, generated=_toy_generated())
    assert problem.startswith("docs/gen.md: quotes docs/toy.json section 'sec', whose figures are stale: "
                              "preset:isda_tiny changed")


def test_write_fixes_wrong_numbers_only(tmp_path: Path) -> None:
    page = f"# Toy\n\nwrong {_fig('sec.x', '0.91', '.2f')} and {_fig('sec.n', '12')}, right {_fig('sec.runs.0', '1.5')}\n"
    root = _repo(tmp_path, page=page)
    assert figures.run(["docs/page.md"], write=True, root=root, generated={}) == []
    assert (root / "docs" / "page.md").read_text() == page.replace("-->0.91<", "-->0.87<").replace("-->12<", "-->2551<")
    assert figures.run(["docs/page.md"], root=root, generated={}) == []


def test_committed_generated_pages_have_renderers() -> None:
    for page, gen in figures.GENERATED.items():
        assert (provenance.ROOT / page).is_file(), page
        assert gen.source is None or (provenance.ROOT / gen.source).is_file(), gen.source


# ---- provenance -------------------------------------------------------------------------------------------------

def test_preset_fingerprint_follows_the_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    before = provenance.fingerprints(["preset:isda_tiny", "preset:isda_r50_coco"])
    assert provenance.fingerprints(["preset:isda_tiny"]) == {"preset:isda_tiny": before["preset:isda_tiny"]}

    def changed() -> config.Config:
        cfg = config.isda_tiny()
        cfg.train.lr *= 2
        return cfg

    monkeypatch.setitem(config.PRESETS, "isda_tiny", changed)
    after = provenance.fingerprints(["preset:isda_tiny", "preset:isda_r50_coco"])
    assert after["preset:isda_tiny"] != before["preset:isda_tiny"]
    assert after["preset:isda_r50_coco"] == before["preset:isda_r50_coco"]
    lr = config.isda_tiny().train.lr
    assert provenance.stale({"depends_on": before}) == [f"preset:isda_tiny: train.lr was {lr!r}, now {2 * lr!r}"]
    # A section that decided that value (the choice behind a default) is current; one that decided another is not.
    assert provenance.stale({"depends_on": before, "decided": {"train.lr": 2 * lr}}) == []
    assert len(provenance.stale({"depends_on": before, "decided": {"train.lr": 3 * lr}})) == 1
    # An earlier record of a choice is not staled by what a later record decided; a section that decided nothing is.
    assert provenance.stale({"depends_on": before, "decided": {"model.hidden_dim": 1}}, {"train.lr": 2 * lr}) == []
    # A later record's decision of the same field excuses an earlier record that decided it otherwise.
    assert provenance.stale({"depends_on": before, "decided": {"train.lr": 3 * lr}}, {"train.lr": 2 * lr}) == []
    assert len(provenance.stale({"depends_on": before}, {"train.lr": 2 * lr})) == 1
    # A section whose every run records what the field did for it (recorded_per_run) is judged by its runs.
    assert provenance.stale({"depends_on": before, "recorded_per_run": ["train.lr"]}) == []
    assert len(provenance.stale({"depends_on": before, "recorded_per_run": ["data.fit_sizes"]})) == 1
    # A figure that depends on the network and its input only (preset:NAME:model,data) is not stale by the lr.
    scoped = {"preset:isda_tiny:model,data": {k: v for k, v in before["preset:isda_tiny"].items()
                                              if k.startswith(("model.", "data."))}}
    assert provenance.stale({"depends_on": scoped}) == []
    # Nor by a training-only switch of the model (denoising queries): the scope leaves them out, also where a record
    # from before still has them; a switch that reaches inference (mask_class) is a change.
    training_only = {f"model.{f}" for f in config.ModelConfig.TRAINING_ONLY}
    assert "model.denoising_groups" in training_only
    assert provenance.fingerprints(scoped)["preset:isda_tiny:model,data"] == {
        k: v for k, v in scoped["preset:isda_tiny:model,data"].items() if k not in training_only}
    assert "model.denoising_groups" in provenance.fingerprint("preset:isda_tiny")
    for change, stale in (({"denoising_groups": 5, "dense_aux": True, "hybrid_queries": 10}, False),
                          ({"mask_class": True}, True)):
        def switched(change: dict = change) -> config.Config:
            cfg = config.isda_tiny()
            cfg.model = dataclasses.replace(cfg.model, **change)
            return cfg

        monkeypatch.setitem(config.PRESETS, "isda_tiny", switched)
        assert bool(provenance.stale({"depends_on": scoped})) is stale, change
        assert provenance.stale({"depends_on": before}), change  # the whole preset: a change either way
    with pytest.raises(ValueError, match="sections are model, loss, data, train"):
        provenance.fingerprint("preset:isda_tiny:model,optimizer")
    # A field added since the measurement: at its class default (a new switch, off) it changes nothing ...
    monkeypatch.setitem(config.PRESETS, "isda_tiny", config.isda_tiny)
    recorded = {k: v for k, v in before["preset:isda_tiny"].items() if k != "model.mask_class"}
    assert provenance.stale({"depends_on": {"preset:isda_tiny": recorded}}) == []

    def switched_on() -> config.Config:
        cfg = config.isda_tiny()
        cfg.model.mask_class = True
        return cfg

    # ... set otherwise in the preset, the recorded figures no longer describe it; a removed field, neither.
    monkeypatch.setitem(config.PRESETS, "isda_tiny", switched_on)
    assert provenance.stale({"depends_on": {"preset:isda_tiny": recorded}}) == [
        "preset:isda_tiny: model.mask_class is True, not its default False (added since)"]
    current = provenance.fingerprint("preset:isda_tiny")
    assert provenance.stale({"depends_on": {"preset:isda_tiny": {**current, "model.gone": 1}}}) == [
        "preset:isda_tiny: model.gone was removed"]


def test_data_fingerprint_follows_the_generator_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gen.py").write_text("SIZE = 128\n")
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    monkeypatch.setitem(provenance.DATA, "toy", "gen.py")
    before = provenance.fingerprint("data:toy")
    (tmp_path / "gen.py").write_text("SIZE = 160\n")
    assert provenance.fingerprint("data:toy") != before
    with pytest.raises(ValueError, match="unknown fingerprint 'data:nope'"):
        provenance.fingerprint("data:nope")


def test_meta_records_provenance() -> None:
    m = provenance.meta("python -m benchmarks.toy", ["data:shapes", "preset:isda_tiny"], {"load_before": 1.234})
    assert m["command"] == "python -m benchmarks.toy" and m["load_average_before"] == 1.23
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", m["date"])
    assert re.fullmatch(r"[0-9a-f]{7,}(\+dirty)?|unknown", m["commit"]), m["commit"]
    assert m["depends_on"] == provenance.fingerprints(["preset:isda_tiny", "data:shapes"])
    assert provenance.stale(m) == []


# ---- derived figures ----------------------------------------------------------------------------------------------

def _run(ap: float, steps: int = 100) -> dict:
    return {"ap": {"AP": ap, "AP50": ap + 0.1}, "iterations": steps}


def test_seed_means_and_difference_over_the_seeds_both_finished() -> None:
    # ISDA's seed 2 did not finish: Mask R-CNN's seed 2 (0.35) is left out of the comparison, not averaged in.
    acc = {"seeds": [0, 1, 2], "isda": {"480": {"0": _run(0.30, 100), "1": _run(0.20, 120), "2": None}},
           "maskrcnn": {"480": {"0": _run(0.25), "1": _run(0.27), "2": _run(0.35)}},
           # Mask R-CNN's held-out seed 1 is missing and its fitted run has only seed 1 (as when one was kept from
           # another invocation): each difference is over the seeds its two entries share.
           "heldout": {"480": {"isda": {"0": _run(0.10), "1": _run(0.14)}, "maskrcnn": {"0": _run(0.15), "1": None},
                               "maskrcnn_fit": {"1": _run(0.20)}, "isda_no_fit": {"0": None}}},
           "levers": {"denoising": {"runs": {"480": _run(0.40), "1800": _run(0.5)}, "seeds": {"1": {"480": _run(0.30)}}}}}
    s = derived.accuracy_summary(acc)
    t = s["test"]["480"]
    assert t["isda"]["ap_mean"] == pytest.approx(25.0) and t["isda"]["steps_mean"] == 110
    assert t["maskrcnn"]["ap_mean"] == pytest.approx(26.0) and t["maskrcnn"]["ap50_mean"] == pytest.approx(36.0)
    assert t["difference"] == pytest.approx(-1.0) and t["noise"] == pytest.approx(10.0) and t["seeds"] == 2
    assert (t["verdict"], t["goal"]) == ("tie", "not met")  # what the pages say, stored beside the figures
    held = s["heldout"]["480"]
    assert set(held) == {"isda", "maskrcnn", "maskrcnn_fit", "noise"}  # the run that did not finish is left out
    assert held["isda"]["ap_mean"] == pytest.approx(12.0) and held["isda"]["seeds"] == 2
    assert held["isda"]["difference"] == pytest.approx(10.0 - 15.0) and held["isda"]["difference_seeds"] == 1
    assert held["isda"]["difference_fit"] == pytest.approx(14.0 - 20.0) and held["isda"]["difference_fit_seeds"] == 1
    assert held["noise"] == pytest.approx(4.0) and held["isda"]["difference_noise"] == 0
    assert held["isda"]["difference_verdict"] == "one seed" and held["isda"]["difference_goal"] == "not met"
    assert held["maskrcnn"]["ap50_mean"] == pytest.approx(25.0) and held["maskrcnn"]["seeds"] == 1
    lever = s["levers"]["denoising"]
    assert set(lever) == {"480", "1800"} and lever["1800"]["seeds"] == 1
    assert lever["480"]["ap_mean"] == pytest.approx(35.0) and lever["480"]["aps"] == pytest.approx([40.0, 30.0])
    assert derived.seed_means({"seeds": [0], "isda": {"480": {"0": _run(0.3)}}}, "480") is None
    # Two models that share no finished seed are not compared at all.
    assert derived.seed_means({"seeds": [0, 1], "isda": {"480": {"0": _run(0.3)}},
                               "maskrcnn": {"480": {"1": _run(0.3)}}}, "480") is None
    # The page says the same: its verdict is over the matched seeds.
    from benchmarks.report.accuracy import _verdict

    assert "**-1.0** AP (means of the 2 seed(s) both finished" in _verdict(acc, "480", ["0", "1", "2"])
    # Both ran, at other seeds: the page says so (not that ISDA has not run); Mask R-CNN alone: that ISDA has not.
    apart = {"seeds": [0, 1], "isda": {"480": {"0": _run(0.3)}}, "maskrcnn": {"480": {"1": _run(0.3)}}}
    assert "no finished seed in common" in _verdict(apart, "480", ["0", "1"])
    del apart["isda"]
    assert "has not run at this budget yet" in _verdict(apart, "480", ["0", "1"])
    # The held-out family's verdicts alike.
    from benchmarks.report.accuracy import _heldout

    def held(**runs: dict) -> str:
        run = {"ap": {"AP": 0.3, "AP50": 0.4, "APs": 0.2}, "iterations": 100, "optimizer": "adamw", "lr": 8e-4}
        return "\n".join(_heldout({"heldout": {"480": {n: {s: run for s in seeds} for n, seeds in runs.items()}}},
                                   intro=False))

    assert "no finished seed in common" in held(isda=["0"], maskrcnn_fit=["1"])
    assert "has not run at this budget yet" in held(maskrcnn=["0", "1"])
    text = held(isda=["0", "1"], maskrcnn_fit=["0", "1"])
    assert "means of the 2 seed(s) both finished" in text and "in common" not in text and "not run at" not in text


@pytest.mark.parametrize("difference, noise, seeds, verdict, goal", [
    (2.6, 1.7, 2, "ahead", "met"), (2.5, 1.0, 2, "ahead", "not met"), (3.0, 4.0, 2, "tie", "not met"),
    (-3.0, 4.0, 2, "tie", "not met"), (-3.0, 1.0, 2, "behind", "not met"), (5.0, 0.0, 1, "one seed", "not met")])
def test_judge_a_difference_by_the_seed_noise_and_the_goal(difference: float, noise: float, seeds: int,
                                                           verdict: str, goal: str) -> None:
    assert derived.judge(difference, noise, seeds) == {"verdict": verdict, "goal": goal}


def test_pairing_side_by_side_or_by_the_speed_probes() -> None:
    def run(date: str, rate: float | None = None) -> dict:
        return {**_run(0.3), "date": date, **({"speed_probe": {"steps_per_s": {"maskrcnn": rate}}} if rate else {})}

    # One group: finished within seconds of each other.
    p = derived.pairing([(run("2026-12-05 10:00:00"), run("2026-12-05 10:00:40"))])
    assert p["side_by_side"] and p["fair"] and p["speed_difference"] is None
    # Kept from another invocation, hours apart: fair only where the probes say the machines ran at one speed.
    apart = [(run("2026-12-05 10:00:00", 4.0), run("2026-12-04 22:00:00", 3.9)),
             (run("2026-12-05 10:00:01", 4.0), run("2026-12-04 22:10:00", 4.0))]
    p = derived.pairing(apart)
    assert not p["side_by_side"] and p["hours_apart"] == pytest.approx(12.0) and p["fair"]
    assert p["speed_difference"] == pytest.approx(4.0 / 3.9 - 1)
    slower = [(run("2026-12-05 10:00:00", 2.6), run("2026-12-04 22:00:00", 4.0))]
    assert derived.pairing(slower)["speed_difference"] == pytest.approx(0.35) and not derived.pairing(slower)["fair"]
    unprobed = derived.pairing([(run("2026-12-05 10:00:00", 4.0), run("2026-12-04 22:00:00"))])
    assert unprobed["speed_difference"] is None and not unprobed["fair"]
    busy = run("2026-12-04 22:00:00", 4.0)
    busy["speed_probe"]["quiet"] = {"valid": False}  # a probe beside other work measures that work too
    assert derived.pairing([(run("2026-12-05 10:00:00", 4.0), busy)])["speed_difference"] is None
    # The page's verdict says so, and leaves the goal unconfirmed.
    from benchmarks.report.accuracy import _verdict

    acc = {"isda": {"480": {"0": run("2026-12-05 10:00:00", 2.6), "1": run("2026-12-05 10:00:00", 2.6)}},
           "maskrcnn": {"480": {"0": run("2026-12-04 22:00:00", 4.0), "1": run("2026-12-04 22:08:00", 4.0)}}}
    text = _verdict(acc, "480", ["0", "1"])
    assert "did not run side by side" in text and "**not a fair pair**" in text and "unconfirmed" in text
    acc["maskrcnn"]["480"] = {"0": run("2026-12-05 10:00:30", 2.6), "1": run("2026-12-05 09:59:50", 2.6)}
    text = _verdict(acc, "480", ["0", "1"])
    assert "ran side by side" in text and "unconfirmed" not in text


def test_stored_accuracy_summary_is_what_the_runs_give() -> None:
    acc = json.loads((provenance.ROOT / "docs" / "benchmarks.json").read_text())["sections"]["accuracy"]
    assert acc["summary"] == derived.accuracy_summary(acc)


# ---- the demo's figures -------------------------------------------------------------------------------------------

def test_demo_summary_to_docs_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``isda demo`` saves summary.json (training and evaluation stubbed), demo_page turns it into demo.json."""
    import isda.data.shapes
    import isda.engine
    from isda.cli import demo
    from isda.engine.evaluation import EvalResult

    out = tmp_path / "run"
    monkeypatch.setattr(isda.data.shapes, "make_shapes_dataset", lambda root: {"train": ("a", "b"), "val": ("c", "d")})
    monkeypatch.setattr(isda.engine, "train", lambda *a, **k: {"iteration": 321, "train_time_s": 90.0})

    def evaluate_and_draw(out_dir, *args, **kwargs):
        (out_dir / "predictions.png").write_bytes(b"\x89PNG toy")
        return EvalResult({"AP": 0.456, "AP50": 0.789, "AP75": 0.5, "APs": 0.4, "APm": 0.5, "APl": -1.0}), {}

    monkeypatch.setattr(demo, "evaluate_and_draw", evaluate_and_draw)
    out.mkdir()
    demo.cmd_demo(argparse.Namespace(out=str(out), data=str(tmp_path / "data"), minutes=1.0, device=None))
    data = demo_page.write(out, tmp_path / "docs")
    d = data["demo"]
    assert (d["ap"], d["ap50"], d["steps"], d["train_minutes"]) == (pytest.approx(45.6), pytest.approx(78.9), 321, 1.5)
    assert 0 <= d["wall_minutes"] < 5
    assert set(d["_meta"]["depends_on"]) == {"preset:isda_tiny", "data:shapes"}
    assert d["_meta"]["command"] == demo_page.COMMAND
    assert json.loads((tmp_path / "docs" / "demo.json").read_text()) == data
    assert (tmp_path / "docs" / "demo_predictions.png").read_bytes() == b"\x89PNG toy"


def test_demo_page_names_a_missing_summary(tmp_path: Path) -> None:
    (tmp_path / "predictions.png").write_bytes(b"")
    with pytest.raises(SystemExit, match=re.escape(f"{tmp_path / 'summary.json'} not found")):
        demo_page.write(tmp_path, tmp_path / "docs")


def test_fingerprints_of_every_writer_are_known() -> None:
    """The names the benchmark writers record resolve (a typo there would make every section stale)."""
    from benchmarks import run

    args = argparse.Namespace(preset="isda_r50_coco", parts=("test",))
    for section in run.SECTIONS:
        provenance.fingerprints(run.depends_on(section, args))


def test_benchmark_sections_record_provenance_and_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks.run stores each section with its _meta (commit, depends_on) and the accuracy section's summary
    (the sections themselves stubbed: no measurement runs here)."""
    from benchmarks import run

    acc = {"seeds": [0], "isda": {"480": {"0": _run(0.30)}}, "maskrcnn": {"480": {"0": _run(0.20)}}}
    monkeypatch.setattr(run, "section_accuracy", lambda args, log, previous=None, choice=None, save=None: dict(acc))
    monkeypatch.setattr(run, "section_msda", lambda args, log: {"cases": {}})
    monkeypatch.setattr(quiet, "load", lambda: 0.5)  # a quiet machine, whatever else runs beside the suite
    monkeypatch.setattr(quiet, "_busy_cpu_seconds", lambda: None)
    out = tmp_path / "quick.json"
    run.main(["--only", "accuracy,msda", "--json", str(out), "--threads", "1"])
    secs = json.loads(out.read_text())["sections"]
    assert secs["accuracy"]["summary"] == derived.accuracy_summary(acc)
    assert secs["accuracy"]["summary"]["test"]["480"]["difference"] == pytest.approx(10.0)
    meta = secs["accuracy"]["_meta"]
    assert meta["depends_on"] == provenance.fingerprints(["preset:isda_tiny", "data:shapes", "data:heldout"])
    assert meta["command"] == f"python -m benchmarks.run --only accuracy,msda --json {out} --threads 1"
    assert meta["threads"] == 1 and meta["commit"] and provenance.stale(meta) == []
    assert meta["recorded_per_run"] == ["data.fit_sizes"] and "recorded_per_run" not in secs["msda"]["_meta"]
    assert secs["msda"]["_meta"]["depends_on"] == {}


def test_command_line_exit_status(capsys: pytest.CaptureFixture) -> None:
    assert figures.main(["--check", "docs/architecture.md"]) == 0
    assert figures.main(["--check", "docs/no_such_page.md"]) == 1
    assert capsys.readouterr().out == "docs/no_such_page.md: no such page\n"


def test_commit_is_dirty_only_for_tracked_code_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    for name in ("src/a.py", "benchmarks/b.py", "docs/c.md"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x\n")
    git("add", ".")
    git("commit", "-qm", "one")
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    head = git("rev-parse", "--short", "HEAD")
    assert provenance.commit() == head
    (tmp_path / "docs" / "c.md").write_text("y\n")  # a page: not what the figures measured
    (tmp_path / "src" / "new.py").write_text("y\n")  # untracked
    assert provenance.commit() == head
    (tmp_path / "benchmarks" / "b.py").write_text("y\n")
    assert provenance.commit() == head + "+dirty"
    monkeypatch.setattr(provenance, "ROOT", tmp_path / "src" / "nowhere")
    assert provenance.commit() == "unknown"
