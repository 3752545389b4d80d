"""The CPU optimisations compute what the straightforward code computes (within float tolerance), and the
benchmark harness runs end to end at a tiny size."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torchvision.ops import masks_to_boxes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds benchmarks/

import isda  # noqa: E402
import isda.config  # noqa: E402
from benchmarks import baseline  # noqa: E402
from benchmarks.common import msda_problem, reference_ms_deform_attn  # noqa: E402
from isda.models.isda import _boxes  # noqa: E402
from isda.ops import ms_deform_attn  # noqa: E402

SMALL_LEVELS = ((9, 13), (5, 7), (3, 4), (1, 2))


@pytest.fixture(autouse=True)
def _one_thread():
    """The test machine's few cores are shared: one thread is much faster than oversubscribing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- deformable attention core ---------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["gather", "grid_sample"])
@pytest.mark.parametrize("batch,queries", [(1, 7), (3, 5)])
def test_ms_deform_attn_matches_textbook_reference_float64(impl, batch, queries):
    value, ss, loc, w = msda_problem(queries, SMALL_LEVELS, batch=batch, heads=3, head_dim=4, points=2,
                                     dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        loc[0, 0, 0, 0, 0] = torch.tensor([0.0, 1.0], dtype=torch.float64)  # image corners, and far outside
        loc[0, -1, -1, -1, -1] = torch.tensor([3.0, -2.0], dtype=torch.float64)
    out = ms_deform_attn(value, ss, loc, w, impl=impl)
    ref = reference_ms_deform_attn(value, ss, loc, w)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (value, loc, w), g)
    want = torch.autograd.grad(ref, (value, loc, w), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_ms_deform_attn_float32_at_encoder_like_size():
    value, ss, loc, w = msda_problem(2000, ((40, 60), (20, 30), (10, 15), (5, 8)))
    torch.testing.assert_close(ms_deform_attn(value, ss, loc, w), reference_ms_deform_attn(value, ss, loc, w),
                               rtol=1e-5, atol=1e-5)


def test_ms_deform_attn_gather_chunks_queries_without_grad():
    from isda.ops import gather_ms_deform_attn_pixels

    value, ss, loc, w = msda_problem(11, SMALL_LEVELS, batch=2, heads=2, head_dim=4, points=3, dtype=torch.float64)
    size = torch.tensor([[wd, h] for h, wd in SMALL_LEVELS], dtype=torch.float64).view(4, 1, 2)
    pixels = loc * size + 0.5
    whole = gather_ms_deform_attn_pixels(value, SMALL_LEVELS, pixels, w, chunk=100)
    torch.testing.assert_close(gather_ms_deform_attn_pixels(value, SMALL_LEVELS, pixels, w, chunk=3), whole,
                               rtol=0, atol=0)
    torch.testing.assert_close(whole, reference_ms_deform_attn(value, ss, loc, w), rtol=1e-12, atol=1e-12)


def test_gather_with_one_map_shared_by_all_heads():
    """value (B, S, 1, D) sampled by every head == the same map repeated per head (forward and gradients)."""
    from isda.ops import gather_ms_deform_attn_pixels

    _, ss, loc, w = msda_problem(6, SMALL_LEVELS, batch=2, heads=3, head_dim=5, points=2, dtype=torch.float64,
                                 requires_grad=True)
    shared = torch.randn(2, int((ss[:, 0] * ss[:, 1]).sum()), 1, 5, dtype=torch.float64, requires_grad=True)
    size = torch.tensor([[wd, h] for h, wd in SMALL_LEVELS], dtype=torch.float64).view(4, 1, 2)
    out = gather_ms_deform_attn_pixels(shared, SMALL_LEVELS, loc * size + 0.5, w)
    ref = reference_ms_deform_attn(shared.expand(-1, -1, 3, -1), ss, loc, w)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (shared, loc, w), g), torch.autograd.grad(ref, (shared, loc, w), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.autograd.gradcheck(lambda v, l, a: gather_ms_deform_attn_pixels(v, SMALL_LEVELS[:2], l, a),
                             (shared[:1, :152].detach().requires_grad_(), (loc[:1, :2, :, :2] * size[:2] + 0.5).detach()
                              .requires_grad_(), w[:1, :2, :, :2].detach().requires_grad_()), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("padded", [False, True])
def test_attention_projecting_after_sampling_equals_projecting_before(padded):
    """MSDeformAttn's decoder path (value_proj applied to the sampled input rows) vs the encoder path
    (value_proj on the whole map, then sampling): same outputs and gradients."""
    from isda.models.deformable_attention import MSDeformAttn

    torch.manual_seed(0)
    attn = MSDeformAttn(dim=64, num_levels=4, num_heads=4, num_points=3)
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.3)
    torch.nn.init.normal_(attn.attention_weights.weight, std=0.3)
    torch.nn.init.normal_(attn.value_proj.bias, std=0.5)
    ss = torch.tensor(SMALL_LEVELS)
    S = int((ss[:, 0] * ss[:, 1]).sum())
    query, value = torch.randn(2, 7, 64), torch.randn(2, S, 64)
    ref_points = torch.rand(2, 7, 4, 2)
    mask = torch.zeros(2, S, dtype=torch.bool)
    if padded:
        mask[1, ::3] = True
    results = []
    for after in (True, False):
        attn.project_after = after
        attn.zero_grad()
        v = value.clone().requires_grad_(True)
        out = attn(query, ref_points, v, ss, mask)
        out.pow(2).sum().backward()
        results.append((out.detach(), v.grad, {n: p.grad.clone() for n, p in attn.named_parameters()}))
    (o1, gv1, gp1), (o2, gv2, gp2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gv1, gv2, rtol=1e-4, atol=1e-5)
    for n in gp1:
        torch.testing.assert_close(gp1[n], gp2[n], rtol=1e-4, atol=1e-4, msg=n)


def test_ms_deform_attn_gradcheck_gather():
    value, ss, loc, w = msda_problem(3, ((4, 3), (2, 2)), heads=2, head_dim=2, points=2, dtype=torch.float64,
                                     requires_grad=True)
    torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn(v, ss, l, a, impl="gather"), (value, loc, w),
                             eps=1e-6, atol=1e-6)


def test_ms_deform_attn_only_some_inputs_need_grad():
    value, ss, loc, w = msda_problem(4, SMALL_LEVELS, heads=2, head_dim=4, points=2, dtype=torch.float64)
    value.requires_grad_(True)
    out = ms_deform_attn(value, ss, loc, w)
    (gv,) = torch.autograd.grad(out.sum(), value)
    (rv,) = torch.autograd.grad(reference_ms_deform_attn(value, ss, loc, w).sum(), value)
    torch.testing.assert_close(gv, rv)
    with pytest.raises(ValueError, match="impl"):
        ms_deform_attn(value, ss, loc, w, impl="cuda_kernel")


# ---- the whole model, optimised vs straightforward ------------------------------------------------------

def _tiny():
    torch.manual_seed(0)
    return isda.build_model("isda_tiny", num_classes=3)


@pytest.mark.parametrize("sizes", [[(192, 256)], [(45, 70), (96, 80)]], ids=["unpadded", "padded_batch"])
def test_inference_equals_straightforward_code(sizes):
    model = _tiny().eval()
    if sizes == [(192, 256)]:  # large enough that the decoder projects after sampling
        from isda.models.deformable_attention import MSDeformAttn

        calls = []
        original = MSDeformAttn._gather_then_project
        MSDeformAttn._gather_then_project = lambda self, *a: calls.append(1) or original(self, *a)
        try:
            with torch.no_grad():
                model([torch.rand(3, *sizes[0])])
        finally:
            MSDeformAttn._gather_then_project = original
        assert len(calls) == model.cfg.dec_layers
    images = [torch.rand(3, *s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(sizes)]
    batch, mask = model.batch_images(images)
    with torch.no_grad():
        fast, fast_preds = model.forward_features(batch, mask), model(images)
        with baseline.reverted(baseline.CHANGES):
            slow, slow_preds = model.forward_features(batch, mask), model(images)
    for key in ("logits", "mask_logits", "memory", "hidden"):
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-4, atol=1e-4)
    for f, s in zip(fast_preds, slow_preds):
        assert torch.equal(f["labels"], s["labels"]) and torch.equal(f["query_index"], s["query_index"])
        torch.testing.assert_close(f["scores"], s["scores"], rtol=1e-4, atol=1e-5)
        # A pixel may flip only where its probability is within float error of the threshold.
        assert (f["masks"] != s["masks"]).float().mean() < 1e-4
        diff = (f["boxes"] - s["boxes"]).abs()
        assert (diff > 0).float().mean() < 0.05 and torch.equal(f["boxes"][diff.sum(1) == 0], s["boxes"][diff.sum(1) == 0])


def test_training_losses_and_gradients_equal_straightforward_code():
    # FrozenBatchNorm as in the paper preset: training-mode BatchNorm on a 2-image batch is so ill-conditioned
    # in float32 that any reordering of a sum (even NCHW vs channels-last convolutions, which agree to 1e-14
    # in float64) moves the stem's gradient by a few percent.
    torch.manual_seed(0)
    model = isda.build_model("isda_tiny", num_classes=3, backbone_norm="frozen_bn").train()
    # At initialisation the encoder samples exactly at pixel centres (reference points at centres, integer
    # offsets), where bilinear interpolation has no derivative: each implementation returns a one-sided
    # one, picked by float rounding. Move the samples off the centres so that gradients are defined.
    with torch.no_grad():
        for layer in model.transformer.encoder:
            layer.self_attn.sampling_offsets.bias.add_(torch.rand_like(layer.self_attn.sampling_offsets.bias) * 0.5 + 0.1)
    masks = torch.zeros(2, 64, 80, dtype=torch.bool)
    masks[0, 5:40, 10:50] = masks[1, 40:60, 30:70] = True
    images = [torch.rand(3, 64, 80), torch.rand(3, 48, 56)]
    targets = [{"labels": torch.tensor([0, 2]), "masks": masks},
               {"labels": torch.tensor([1]), "masks": masks[:1, :48, :56]}]
    results = []
    for revert in ([], list(baseline.CHANGES)):
        model.zero_grad()
        with baseline.reverted(revert):
            losses = model(images, targets)
            losses["loss"].backward()
        results.append((losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (fast_losses, fast_grads), (slow_losses, slow_grads) = results
    for k in fast_losses:
        torch.testing.assert_close(fast_losses[k], slow_losses[k], rtol=1e-4, atol=1e-5)
    assert fast_grads.keys() == slow_grads.keys()
    for n in fast_grads:
        torch.testing.assert_close(fast_grads[n], slow_grads[n], rtol=1e-3, atol=1e-5, msg=n)


def test_boxes_equal_masks_to_boxes():
    masks = torch.rand(40, 33, 47, generator=torch.Generator().manual_seed(0)) > 0.97
    masks[1] = False
    masks[2] = False
    masks[2, 32, 46] = True  # one pixel in the last corner
    want = torch.zeros(40, 4)
    nonempty = masks.flatten(1).any(1)
    want[nonempty] = masks_to_boxes(masks[nonempty]).float()
    assert torch.equal(_boxes(masks), want)
    assert torch.equal(_boxes(masks), baseline.boxes(masks))
    assert _boxes(masks[:0]).shape == (0, 4)


@pytest.mark.parametrize("image_size,output_size", [((61, 90), (61, 90)), ((61, 90), (40, 57))])
def test_upsample_masks_equals_straightforward_code(image_size, output_size):
    model = _tiny()
    probs = torch.rand(7, 16, 24, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.upsample_masks(probs, image_size, output_size, chunk=3),
                       baseline.upsample_masks(model, probs, image_size, output_size, chunk=3))


def test_reverted_restores_everything():
    before = {(id(o), a): getattr(o, a) for changes in baseline.CHANGES.values() for o, a, _ in changes}
    with baseline.reverted(baseline.CHANGES):
        assert isda.models.isda._boxes is baseline.boxes
    after = {(id(o), a): getattr(o, a) for changes in baseline.CHANGES.values() for o, a, _ in changes}
    assert before == after


# ---- the harness at a tiny size ------------------------------------------------------------------

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
