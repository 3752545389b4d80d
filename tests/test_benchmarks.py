"""The benchmark harness runs end to end at a tiny size: the ISDA / Mask R-CNN workers and the page, the
before/after section against a git revision, the accuracy runs and their merging."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds benchmarks/

import isda.config  # noqa: E402

SMALL_LEVELS = ((9, 13), (5, 7), (3, 4), (1, 2))
pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_harness_and_page_at_tiny_size(tmp_path):
    from benchmarks import bench_msda
    from benchmarks.procs import compare
    from benchmarks.report import render

    common = ["--task", "infer", "--size", "64x64", "--threads", "1"]
    inf = compare({"isda": [*common, "--model", "isda", "--preset", "isda_tiny"],
                   "maskrcnn": [*common, "--model", "maskrcnn"]}, repeats=1, warmup=0, components=1, log=lambda m: None)
    assert inf["maskrcnn"]["detections"] == 100  # the mask head ran on 100 detections
    assert inf["isda"]["detections"] == isda.config.get_preset("isda_tiny").model.num_detections
    for name in ("isda", "maskrcnn"):
        assert inf[name]["time"]["median"] > 0 and inf[name]["peak_rss_gib"] > 0.1
        assert inf[name]["components"]["total"] > 0
    c = inf["isda"]["components"]
    assert sum(v for k, v in c.items() if k != "total") == pytest.approx(c["total"])
    inf["ratio_latency"] = inf["isda"]["time"]["median"] / inf["maskrcnn"]["time"]["median"]
    inf["ratio_peak_rss"] = inf["isda"]["peak_rss_gib"] / inf["maskrcnn"]["peak_rss_gib"]
    msda = bench_msda.run(repeats=1, shapes=SMALL_LEVELS, queries={"encoder": 40, "decoder": 5}, log=lambda m: None)
    assert set(msda["cases"]) == {"encoder/forward", "encoder/forward_backward", "decoder/forward",
                                  "decoder/forward_backward"}
    results = {"machine": {"cpu": "test", "threads": 1}, "sections": {"inference": inf, "msda": msda}}
    render(results, tmp_path / "benchmarks.md")
    page = (tmp_path / "benchmarks.md").read_text()
    assert "ISDA / Mask R-CNN" in page and "Deformable attention core" in page and "not measured" in page.lower()
    assert (tmp_path / "benchmarks.png").stat().st_size > 1000


def test_maskrcnn_shapes_loop_runs_and_is_evaluated_like_isda(tmp_path):
    from benchmarks.maskrcnn_shapes import to_maskrcnn_target, train_maskrcnn
    from isda.config import apply_overrides, get_preset
    from isda.data import make_shapes_dataset

    masks = torch.zeros(2, 20, 30, dtype=torch.bool)
    masks[0, 3, 4:9] = True  # one pixel high: the box must still have a positive size
    masks[1, 5:15, 10:11] = True
    t = to_maskrcnn_target({"labels": torch.tensor([0, 4]), "masks": masks})
    assert t["labels"].tolist() == [1, 5] and t["masks"].dtype == torch.uint8
    assert t["boxes"].tolist() == [[4.0, 3.0, 9.0, 4.0], [10.0, 5.0, 11.0, 15.0]]

    data = make_shapes_dataset(tmp_path / "shapes", num_train=4, num_val=2, image_size=64, seed=0)
    cfg = apply_overrides(get_preset("isda_tiny"), {"batch_size": 2, "num_workers": 0, "test_short_side": 64,
                                                    "train_short_sides": [64], "test_max_size": 64})
    res = train_maskrcnn(cfg, *data["train"], *data["val"], budget_s=0.01, warmup_iters=1, roi_batch=32, detections=10,
                         log=lambda m: None)
    assert res["iterations"] == 1 and res["nonfinite_steps"] == 0
    assert set(res["ap"]) >= {"AP", "AP50", "AP75"} and 0.0 <= res["ap"]["AP"] <= 1.0


def _in_git_checkout() -> bool:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _in_git_checkout(), reason="needs the repository's git history")
def test_before_after_runs_a_git_revision_against_this_tree(tmp_path):
    from benchmarks import bench_changes
    from benchmarks.report import render

    with bench_changes.source_of("HEAD") as src:
        assert (src / "isda" / "__init__.py").is_file()
    res = bench_changes.run("HEAD", repeats=1, infer_size=(64, 64), train_size=(64, 64), preset="isda_tiny",
                            threads=1, log=lambda m: None)
    assert res["before"] == bench_changes.describe("HEAD")
    for part in ("inference", "train"):
        assert res[part]["before"]["time"]["median"] > 0 and res[part]["after"]["time"]["median"] > 0
        assert res[part]["ratio"] > 0
    render({"machine": {"cpu": "test"}, "sections": {"before_after": res}}, tmp_path / "b.md")
    assert f"revision {res['before']} vs {res['after']}" in (tmp_path / "b.md").read_text()


def _acc_run(ap: float, steps: int = 10) -> dict:
    return {"ap": {"AP": ap, "AP50": 2 * ap, "AP75": ap / 2}, "iterations": steps, "train_time_s": 2.0 * steps}


def test_accuracy_invocations_merge_and_render_per_budget(tmp_path):
    from benchmarks import bench_accuracy
    from benchmarks.report import render

    # An earlier invocation: the main pair at 8 minutes and one lever at 8 minutes, the way run() records them.
    previous = {"num_train": 4, "num_val": 2, "image_size": 128, "threads_per_run": 1, "isda_preset": "isda_tiny",
                "isda_recipe": {"lr": 1e-4, "weight_decay": 1e-4, "batch_size": 8, "clip_max_norm": 0.1,
                                "num_queries": 100, "num_detections": 50},
                "budgets_s": [480.0], "variant_budgets_s": [480.0], "isda": {"480": _acc_run(0.10)},
                "maskrcnn": {"480": {**_acc_run(0.05), "optimizer": "adamw", "lr": 1e-4, "batch_size": 8,
                                     "clip_max_norm": 0.1, "warmup_iters": 100}},
                "levers": {"no_varifocal": {"overrides": {"loss.class_loss": "focal"}, "runs": {"480": _acc_run(0.07)}}},
                "_meta": {"command": "python -m benchmarks.run first"}}
    # This invocation re-runs nothing of it and adds the lever at 30 minutes on the default ISDA run of 30 minutes.
    new = {**{k: previous[k] for k in bench_accuracy._SAME if k in previous}, "budgets_s": [1800.0],
           "variant_budgets_s": [1800.0], "isda": {"1800": _acc_run(0.30)}, "maskrcnn": {},
           "levers": {"no_varifocal": {"overrides": {"loss.class_loss": "focal"}, "runs": {"1800": _acc_run(0.2)}}},
           "_meta": {"command": "python -m benchmarks.run second"}}
    merged = bench_accuracy.merge(previous, new)
    assert merged["budgets_s"] == [480.0, 1800.0] and merged["variant_budgets_s"] == [480.0, 1800.0]
    assert set(merged["isda"]) == {"480", "1800"} and merged["maskrcnn"] == {"480": previous["maskrcnn"]["480"]}
    assert set(merged["levers"]["no_varifocal"]["runs"]) == {"480", "1800"}
    assert merged["earlier"] == [previous["_meta"]] and merged["_meta"] == new["_meta"]
    # Another configuration of the preset is another experiment: nothing of the earlier one is kept.
    other = {**new, "isda_recipe": {**new["isda_recipe"], "lr": 2e-4}}
    assert bench_accuracy.merge(previous, other) == other

    render({"machine": {"cpu": "test"}, "sections": {"accuracy": merged}}, tmp_path / "b.md")
    page = (tmp_path / "b.md").read_text()
    lines = [line for line in page.splitlines() if line.startswith("| no_varifocal")]
    assert lines == ["| no_varifocal (`loss.class_loss=focal`) | 7.0 | 14.0 | 10 | 2.00 | 20.0 | 40.0 | 10 | 2.00 |"]
    assert "| the tiny preset | 10.0 | 20.0 | 10 | 2.00 | 30.0 | 60.0 | 10 | 2.00 |" in page
    assert "At 8 min: ISDA tiny − Mask R-CNN **+5.0** AP" in page and "At 30 min" not in page  # no Mask R-CNN at 30
    assert "benchmarks.run first" in page and "benchmarks.run second" in page


def test_accuracy_run_saves_each_finished_run_and_keeps_earlier_ones(tmp_path):
    from benchmarks import bench_accuracy

    saved = []
    earlier = {"threads_per_run": 1, "num_train": 4, "num_val": 2, "image_size": 128, "budgets_s": [1.0],
               "isda": {"1": _acc_run(0.1)}, "maskrcnn": {"1": _acc_run(0.05)}}
    with pytest.raises(ValueError, match="no_such_lever"):
        bench_accuracy.run(tmp_path, [], [1.0], variants=["no_such_lever"], threads=1)
    res = bench_accuracy.run(tmp_path, [], [], num_train=4, num_val=2, threads=1, variants=["no_varifocal@1"],
                             previous=earlier, save=lambda r: saved.append(copy.deepcopy(r)), log=lambda m: None)
    assert len(saved) == 1 and saved[0] == res
    run = res["levers"]["no_varifocal"]
    assert run["overrides"] == {"loss.class_loss": "focal"} and run["runs"]["1"]["iterations"] >= 1
    assert res["isda"] == earlier["isda"] and res["maskrcnn"] == earlier["maskrcnn"]  # kept, not re-run
    assert res["variant_budgets_s"] == [1.0] and res["isda_config"]["loss"]["class_loss"] == "varifocal"
