"""The CLI end to end on a tiny generated dataset, and its one-line user errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from engine_utils import SMALL, single_thread
from test_report import assert_valid_report
from isda.cli import main


def small_sets(**extra):
    args = []
    for key, value in {**SMALL, **extra}.items():
        value = ",".join(map(str, value)) if isinstance(value, list) else value
        args += ["--set", f"{key}={value}"]
    return args


@pytest.fixture(scope="module")
def trained(module_dir):
    """shapes -> train a few steps; shared by the tests below."""
    root = module_dir
    with single_thread():
        assert main(["shapes", str(root / "data"), "--num-train", "8", "--num-val", "4", "--size", "64"]) == 0
        assert main(["train", "--preset", "isda_tiny", "--data", str(root / "data"), "--out", str(root / "run"),
                     "--max-iters", "3", *small_sets()]) == 0
    return root


def test_train_writes_a_readable_run_directory(trained):
    run = trained / "run"
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "results_val.json", "curves.png",
                 "val_predictions.png"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r["type"] == "train"] == [1, 2, 3]
    assert any(r["type"] == "val" for r in rows)
    assert "d0.loss_cls" in rows[0] and "grad_norm" in rows[0] and "lr" in rows[0]
    torch.load(run / "best.pt", weights_only=True)
    for png in ("curves.png", "val_predictions.png"):
        Image.open(run / png).verify()
    with Image.open(run / "val_predictions.png") as im:  # 4 images x (ground truth, prediction), 384 px panels
        assert im.size[0] > 4 * 384 and im.size[1] > 384
    assert_valid_report(run / "report.html", "isda train", "val_predictions.png", "config.yaml")


def test_eval_prints_the_table_and_writes_loadable_results(trained, capsys):
    out = trained / "eval.json"
    with single_thread():
        assert main(["eval", "--weights", str(trained / "run" / "best.pt"), "--data", str(trained / "data"),
                     "--results", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "AP50" in printed and "circle" in printed
    assert f"report: {trained / 'eval_report.html'}" in printed
    assert_valid_report(trained / "eval_report.html", "isda eval", "eval_predictions.png", "eval.json")
    gt = COCO(str(trained / "data" / "annotations" / "instances_val.json"))
    results = json.loads(out.read_text())
    if results:
        gt.loadRes(str(out))


def test_eval_precision_bf16_runs_the_model_under_bf16_autocast(trained, capsys, monkeypatch):
    """--precision bf16 reaches the model (isda.inference's autocast, asked for bf16 on the CPU) and gives the
    float32 evaluation's scores to bfloat16's rounding (the ranked scores of each image within 0.05)."""
    import isda.inference

    asked = []
    real = isda.inference.autocast
    monkeypatch.setattr(isda.inference, "autocast", lambda device, amp: asked.append((device.type, amp)) or real(device, amp))
    scores = {}
    for precision in ("fp32", "bf16"):
        out = trained / f"eval_{precision}.json"
        with single_thread():
            assert main(["eval", "--weights", str(trained / "run" / "best.pt"), "--data", str(trained / "data"),
                         "--results", str(out), "--precision", precision]) == 0
        assert "AP50" in capsys.readouterr().out
        results = json.loads(out.read_text())
        scores[precision] = {i: sorted((r["score"] for r in results if r["image_id"] == i), reverse=True)
                             for i in {r["image_id"] for r in results}}
    assert asked == [("cpu", "bf16")]
    assert scores["fp32"] and scores["fp32"].keys() == scores["bf16"].keys()
    for i, ranked in scores["fp32"].items():
        assert len(ranked) == len(scores["bf16"][i])
        np.testing.assert_allclose(scores["bf16"][i], ranked, atol=0.05)


def test_predict_writes_overlays_figures_and_results(trained, capsys):
    out = trained / "pred"
    val = trained / "data" / "val"
    files = sorted(val.iterdir())
    with single_thread():
        assert main(["predict", "--weights", str(trained / "run" / "best.pt"), str(files[0]), str(val / "*.png"),
                     "--out", str(out), "--score-thr", "0.0", "--show-reference-points",
                     "--show-sampling-points"]) == 0
    for f in files:
        with Image.open(out / f"{f.stem}_pred.png") as im:
            assert im.size == (384, 384)  # 64 px images drawn at the display size
        Image.open(out / f"{f.stem}_reference_points.png").verify()
        Image.open(out / f"{f.stem}_sampling_points.png").verify()
    results = json.loads((out / "results.json").read_text())
    assert results and {"image_id", "category_id", "segmentation", "score"} <= set(results[0])
    # Ids index the listed images; the json is a valid COCO results file for matching ground truth.
    gt = {"images": [{"id": i, "width": 64, "height": 64, "file_name": "x"} for i in range(len(files) + 1)],
          "annotations": [], "categories": [{"id": c, "name": str(c)} for c in range(1, 6)]}
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    coco.loadRes(str(out / "results.json"))
    # With a zero threshold every detection is drawn: the overlay differs from the input image.
    assert not np.array_equal(np.asarray(Image.open(out / f"{files[0].stem}_pred.png")), np.asarray(Image.open(files[0])))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "isda", *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_user_error_through_python_m_isda_is_one_line(tmp_path):
    """The entry point end to end; every other bad input or fault: tests/test_fault_corpus.py (in-process)."""
    assert_one_line_error(run_cli("eval", "--weights", str(tmp_path / "missing.pt"), "--data", str(tmp_path)),
                          "missing.pt")


def test_convert_then_train_from_the_converted_weights(trained, tmp_path, capsys):
    """A Deformable-DETR (fundamentalvision layout) file -> isda convert -> isda train --init."""
    from engine_utils import tiny_config
    from isda.models.isda import ISDA
    from isda.weights import export_state_dict

    cfg = tiny_config()
    torch.manual_seed(1)
    source = ISDA(cfg.model, cfg.loss)
    detr = tmp_path / "r18_deformable_detr.pth"
    torch.save({"model": export_state_dict(source, "detr")}, detr)
    converted = tmp_path / "init.pth"
    model_sets = small_sets()[: 2 * 8]  # the model fields of SMALL
    assert main(["convert", str(detr), str(converted), "--preset", "isda_tiny", "--num-classes", "5", *model_sets]) == 0
    report = capsys.readouterr().out
    assert "mask_features" in report and "bbox_embed" not in report.split("left at")[-1]
    assert main(["convert", str(detr), str(tmp_path / "x.pth"), "--preset", "isda_tiny"]) == 2  # sizes differ
    assert "r18_deformable_detr.pth: the checkpoint has 1 encoder layers" in capsys.readouterr().err
    with single_thread():
        assert main(["train", "--preset", "isda_tiny", "--data", str(trained / "data"), "--out", str(tmp_path / "run"),
                     "--max-iters", "1", "--init", str(converted), *small_sets()]) == 0
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    # Initialised from the file, then one small step: the transformer is close to the source's.
    src = source.state_dict()["transformer.level_embed"]
    assert (ckpt["transformer.level_embed"] - src).abs().max() < 1e-2
