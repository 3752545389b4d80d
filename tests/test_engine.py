"""Training engine: exact resume, non-finite loss handling, parameter groups, lr schedule, run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import isda.engine as engine
import isda.engine.trainer
from isda.engine.checkpoint import CheckpointError
from isda.config import Config, ConfigError, TrainConfig, from_dict, get_preset
from isda.engine.schedule import RunLength, max_iters_in_warmup_warning, too_few_steps_warning, warmup_factor
from isda.models.isda import ISDA

from engine_utils import shapes, single_thread, tiny_config


@pytest.fixture(autouse=True)
def _single_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    return shapes(tmp_path_factory.mktemp("shapes"))


def _rows(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == kind]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_mid_epoch_gives_identical_weights(data, tmp_path):
    # Random flips, scales and crops, dropout (the restored RNG state), gradient accumulation, warm-up and
    # an lr step at epoch 1 (step 3): all must line up after resuming in the middle of epoch 1.
    cfg = tiny_config(epochs=3, lr_drops=[1 / 3], accumulate=2, warmup_iters=2, dropout=0.1)
    cfg.train.warmup_frac = 0.0  # the step-count warm-up alone, whose factors are listed below
    straight = engine.train(cfg, *data["train"], out_dir=tmp_path / "a", log=lambda _m: None)
    assert straight["iteration"] == 6 and straight["stopped"] == "completed"  # 8 images / (2 x 2) per step

    part = engine.train(cfg, *data["train"], out_dir=tmp_path / "b", max_iters=3, log=lambda _m: None)
    assert part["stopped"] == "max_iters" and part["iteration"] == 3
    ckpt = _load(tmp_path / "b" / "last.pt")
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["iteration"]) == (1, 1, 3)
    with pytest.raises(FileExistsError, match="resume"):
        engine.train(cfg, *data["train"], out_dir=tmp_path / "b", log=lambda _m: None)
    resumed = engine.train(cfg, *data["train"], out_dir=tmp_path / "b", resume=True, log=lambda _m: None)
    assert resumed["iteration"] == 6 and resumed["stopped"] == "completed"

    a, b = _load(tmp_path / "a" / "last.pt"), _load(tmp_path / "b" / "last.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(state_a[i]["exp_avg_sq"], state_b[i]["exp_avg_sq"]) for i in state_a)
    assert {float(s["step"]) for s in state_a.values()} == {6.0}  # one AdamW step per 2 batches
    # metrics.jsonl of the resumed run has each step once, in order.
    assert [r["iter"] for r in _rows(tmp_path / "b", "train")] == list(range(1, 7))
    lrs = [r["lr"] for r in _rows(tmp_path / "a", "train")]
    assert lrs == pytest.approx([cfg.train.lr * f for f in (0.5, 1, 0.1, 0.1, 0.1, 0.1)])


def test_time_budget_stops_saves_and_evaluates(data, tmp_path):
    summary = engine.train(tiny_config(time_budget_s=0.01), *data["train"], *data["val"], out_dir=tmp_path,
                           log=lambda _m: None)
    assert summary["stopped"] == "time_budget" and summary["iteration"] == 1
    assert _load(tmp_path / "last.pt")["iteration"] == 1
    assert [r["iter"] for r in _rows(tmp_path, "val")] == [1]


def test_run_directory_validation_and_best_checkpoint(data, tmp_path, monkeypatch):
    saves: list[tuple[str, int]] = []
    save = isda.engine.trainer.save_checkpoint

    def recording_save(state, path):
        saves.append((Path(path).name, state["iteration"]))
        save(state, path)

    monkeypatch.setattr(isda.engine.trainer, "save_checkpoint", recording_save)
    cfg = tiny_config(epochs=1, log_every=2, checkpoint_every=2)
    messages: list[str] = []
    drawn = []
    summary = engine.train(cfg, *data["train"], *data["val"], out_dir=tmp_path, log=messages.append,
                           on_validation=lambda out, model, val, _data: drawn.append((out, model.training, len(val))))
    assert saves == [("last.pt", 2), ("last.pt", 4), ("best.pt", 4)]  # every 2 steps, at the epoch's end
    assert drawn == [(tmp_path, True, 4)]  # after the one validation; the loop itself draws nothing
    assert not list(tmp_path.glob("*.png"))
    assert {"config.yaml", "metrics.jsonl", "last.pt", "best.pt", "results_val.json"} <= {
        p.name for p in tmp_path.iterdir()}
    assert not list(tmp_path.glob(".*.tmp"))
    train_rows, val_rows = _rows(tmp_path, "train"), _rows(tmp_path, "val")
    assert [r["iter"] for r in train_rows] == [2, 4]
    expected = {"loss", "loss_cls", "loss_dice", "d0.loss_cls", "d0.loss_dice", "grad_norm", "lr", "time", "epoch"}
    assert expected <= set(train_rows[0])
    assert len(val_rows) == 1 and {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(val_rows[0])
    assert summary["val"]["AP"] == val_rows[0]["AP"] and summary["best_ap"] == val_rows[0]["AP"]
    results = json.loads((tmp_path / "results_val.json").read_text())
    assert {r["image_id"] for r in results} <= set(range(1, 5)) and len(results) == 4 * cfg.model.num_detections
    best = _load(tmp_path / "best.pt")
    assert best["class_names"] == ["circle", "square", "triangle", "star", "ring"]
    assert best["config"]["model"]["num_classes"] == 5
    assert any("mask AP" in m for m in messages)


def test_evaluate_returns_coco_results_at_original_size(data):
    from isda.data import CocoInstanceDataset, build_transforms

    cfg = tiny_config(test_short_side=96, test_max_size=96)  # predict at 96 px, score at the stored 64 px
    val = CocoInstanceDataset(*data["val"], build_transforms(cfg.data, False), train=False)
    torch.manual_seed(0)
    model = ISDA(cfg.model, cfg.loss).train()
    result, results = engine.evaluate(model, val, "cpu", batch_size=2)
    assert model.training  # mode restored
    assert set(result.stats) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert {r["image_id"] for r in results} == set(val.ids)
    assert all(r["segmentation"]["size"] == [64, 64] for r in results)


def test_augmentation_depends_only_on_seed_epoch_and_index(data):
    from isda.data import CocoInstanceDataset, build_transforms

    dataset = CocoInstanceDataset(*data["train"], build_transforms(tiny_config().data, True), train=True)
    samples = engine.SeededSamples(dataset, seed=1)
    first = samples[3][0]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert torch.equal(samples[3][0], first)  # whatever the global generator's state ...
    assert torch.equal(torch.get_rng_state(), state)  # ... which is left untouched
    views = set()
    for epoch in range(6):
        samples.set_epoch(epoch)
        image = samples[3][0]
        views.add((*image.shape, round(float(image.sum()), 2)))
    assert len(views) > 1  # a new augmentation each epoch


def test_nonfinite_loss_skips_the_step_without_touching_weights(data, tmp_path, monkeypatch):
    snapshots: list[dict[str, torch.Tensor]] = []
    forward = ISDA.forward

    def forward_nan_on_calls_2_3(self, images, targets=None, output_sizes=None):
        snapshots.append({k: v.clone() for k, v in self.state_dict().items()})
        losses = forward(self, images, targets, output_sizes)
        if len(snapshots) in (2, 3):
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses

    monkeypatch.setattr(ISDA, "forward", forward_nan_on_calls_2_3)
    cfg = tiny_config(max_nonfinite=3, epochs=1)
    engine.train(cfg, *data["train"], out_dir=tmp_path, log=lambda _m: None)

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert not same(snapshots[0], snapshots[1])  # step 1 trained
    assert same(snapshots[1], snapshots[2]) and same(snapshots[1], snapshots[3])  # steps 2 and 3 skipped
    assert not same(snapshots[3], _load(tmp_path / "last.pt")["model"])  # step 4 trained again
    skips = _rows(tmp_path, "skip")
    assert [(r["iter"], r["consecutive"]) for r in skips] == [(2, 1), (3, 2)]
    assert [r["iter"] for r in _rows(tmp_path, "train")] == [1, 4]
    optimizer_state = _load(tmp_path / "last.pt")["optimizer"]["state"]
    assert {float(s["step"]) for s in optimizer_state.values()} == {2.0}  # two real AdamW steps


def test_nonfinite_loss_stops_after_max_in_a_row(data, tmp_path, monkeypatch):
    forward = ISDA.forward

    def forward_nan(self, images, targets=None, output_sizes=None):
        return {k: v * float("inf") * 0 for k, v in forward(self, images, targets, output_sizes).items()}

    monkeypatch.setattr(ISDA, "forward", forward_nan)
    messages: list[str] = []
    with pytest.raises(engine.NonFiniteLossError, match="non-finite for 2 steps in a row"):
        engine.train(tiny_config(max_nonfinite=2), *data["train"], out_dir=tmp_path, log=messages.append)
    assert [r["consecutive"] for r in _rows(tmp_path, "skip")] == [1, 2]
    assert sum("skipped" in m for m in messages) == 2


def test_param_groups_reduced_lr_for_backbone_and_linear_projections():
    cfg = tiny_config(frozen_stages=1, lr=1e-3, lr_backbone_mult=0.1, lr_linear_proj_mult=0.25)
    model = ISDA(cfg.model, cfg.loss)
    groups = engine.param_groups(model, cfg.train)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: [names[id(p)] for p in g["params"]] for g in groups}
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == pytest.approx({"backbone": 1e-4, "linear_proj": 2.5e-4, "other": 1e-3})
    assert all(n.startswith("backbone.") for n in by_group["backbone"])
    assert all(".sampling_offsets." in n or n.startswith("transformer.reference_points.")
               for n in by_group["linear_proj"])
    assert "transformer.reference_points.weight" in by_group["linear_proj"]
    assert "transformer.decoder.0.cross_attn.sampling_offsets.weight" in by_group["linear_proj"]
    assert not any(n.startswith("backbone.") or "sampling_offsets" in n or "reference_points" in n
                   for n in by_group["other"])
    listed = [n for ns in by_group.values() for n in ns]
    assert len(listed) == len(set(listed))  # no parameter twice
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(listed) == trainable  # none missing, frozen ones (stem + layer1) left out
    assert "backbone.layer1.0.conv1.weight" not in trainable and "backbone.layer2.0.conv1.weight" in trainable


def test_the_fused_optimizer_takes_the_reference_adamw_steps_per_group():
    """engine.adamw (the trainer's, fused on the CPU) moves every parameter as torch's reference AdamW (the plain
    per-tensor loop) with the same groups, group learning rates and weight decay, over a few steps."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)]
    copies = [torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)]
    for a, b in zip(layers, copies):
        b.load_state_dict(a.state_dict())

    def groups(ls):
        return [{"params": list(ls[0].parameters()), "lr": 1e-2}, {"params": list(ls[1].parameters()), "lr": 3e-3}]

    start = layers[0].weight.detach().clone()
    fused = engine.adamw(groups(layers), 1e-3, 0.05)
    reference = torch.optim.AdamW(groups(copies), lr=1e-3, weight_decay=0.05, foreach=False)
    assert fused.defaults["fused"] and [g["lr"] for g in fused.param_groups] == [1e-2, 3e-3]
    x = torch.randn(8, 5)
    for _ in range(3):
        for ls, opt in ((layers, fused), (copies, reference)):
            opt.zero_grad()
            ls[1](ls[0](x).relu()).square().sum().backward()
            opt.step()
    for a, b in zip(layers, copies):
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert (layers[0].weight - start).abs().min() > 1e-3  # every weight moved: three steps at lr 1e-2


def test_lr_factor_warmup_then_drops_at_fractions_of_the_run():
    cfg = TrainConfig(lr_drops=(0.4, 0.6), lr_gamma=0.1, warmup_iters=4)
    factors = [engine.lr_factor(step, step / 25, cfg, total_steps=25) for step in range(25)]
    assert factors[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert factors[9] == 1.0 and factors[10] == pytest.approx(0.1) and factors[15] == pytest.approx(0.01)


def test_warmup_fraction_of_a_time_budget_then_drops():
    # The warm-up is a fraction of the run, whatever the step time: full lr from 5 % of it on.
    assert warmup_factor(0.0, 0.05) == 0.01 and warmup_factor(0.025, 0.05) == pytest.approx(0.5)
    assert warmup_factor(0.05, 0.05) == 1.0 and warmup_factor(0.9, 0.05) == 1.0 and warmup_factor(0.0, 0.0) == 1.0
    cfg = TrainConfig(lr_drops=(0.8,), lr_gamma=0.1, warmup_frac=0.05, time_budget_s=480)
    # A time budget: the step count says nothing, the progress says all (step 10**6 at 1 % of the run).
    assert engine.lr_factor(10**6, 0.01, cfg) == pytest.approx(0.2)
    assert engine.lr_factor(5, 0.5, cfg) == 1.0 and engine.lr_factor(5, 0.9, cfg) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="train.warmup_frac"):
        Config(train=TrainConfig(warmup_frac=1.0)).validate()


def test_official_drops_land_on_epoch_boundaries():
    # 27/42 of a 42-epoch run is float-inexact; the drop must still fall on the first step of epoch 27.
    cfg = get_preset("isda_r50_coco").train
    for steps_per_epoch in (1, 7, 14_786):
        length = RunLength.of(cfg, steps_per_epoch)
        for k, epoch in enumerate((27, 33, 35, 36, 37)):
            first = epoch * steps_per_epoch
            assert engine.lr_factor(first - 1, 0, cfg, length.steps) == pytest.approx(0.1 ** k)
            assert engine.lr_factor(first, 0, cfg, length.steps) == pytest.approx(0.1 ** (k + 1))


def test_run_length_time_budget_then_steps_then_epochs():
    assert RunLength.of(TrainConfig(epochs=3, max_steps=0), 10).steps == 30
    assert RunLength.of(TrainConfig(epochs=3, max_steps=7), 10).steps == 7
    budget = RunLength.of(TrainConfig(epochs=3, max_steps=7, time_budget_s=100), 10)
    assert budget.steps is None and budget.progress(step=10**6, elapsed_s=50) == 0.5  # steps do not count


def test_lr_schedule_follows_a_time_budget():
    cfg = TrainConfig(lr_drops=(0.8,), lr_gamma=0.1, time_budget_s=100)
    assert engine.lr_factor(0, 0.79, cfg) == 1.0
    assert engine.lr_factor(0, 0.81, cfg) == pytest.approx(0.1)


def test_legacy_lr_steps_in_epochs_become_fractions():
    cfg = from_dict({"train": {"epochs": 50, "lr_steps": [40, 45]}}).validate()
    assert cfg.train.lr_drops == pytest.approx((0.8, 0.9))


def test_too_few_steps_warning_names_the_numbers():
    cfg = TrainConfig(epochs=30, batch_size=8)
    length = RunLength.of(cfg, steps_per_epoch=1)
    message = too_few_steps_warning(length.steps, 3, 8, length, cfg)
    assert "only 30 optimizer steps" in message and "1 step(s) per epoch of 3 images at 8 per step" in message
    assert "train.max_steps" in message
    assert too_few_steps_warning(300, 3, 8, length, cfg) is None


def test_max_iters_inside_the_warm_up_is_warned():
    # The warm-up is a fraction of the planned run: --max-iters 45 of a 15,000-step plan at warmup_frac 0.05 stops
    # in its first 750 steps, at a few percent of train.lr.
    cfg = TrainConfig(max_steps=15000, warmup_frac=0.05)
    length = RunLength.of(cfg, steps_per_epoch=10)
    message = max_iters_in_warmup_warning(45, length, cfg)
    assert "--max-iters 45" in message and "first 750 of 15000 planned steps" in message
    assert "train.max_steps=45" in message
    assert max_iters_in_warmup_warning(750, length, cfg) is None
    assert max_iters_in_warmup_warning(None, length, cfg) is None
    assert max_iters_in_warmup_warning(45, length, TrainConfig(max_steps=15000)) is None  # no warm-up
    budget = TrainConfig(time_budget_s=60, warmup_frac=0.05)  # a time budget's warm-up is in seconds
    assert max_iters_in_warmup_warning(1, RunLength.of(budget, steps_per_epoch=10), budget) is None


def test_small_dataset_run_in_steps_plans_warns_and_validates_at_fractions(data, tmp_path):
    # 8 images at batch 2 are 4 steps per epoch: a run of 10 steps crosses epoch ends mid-way, validates
    # at 1/2 and 2/2 of it (not at every epoch end) and says how many steps it plans, with the warning.
    messages: list[str] = []
    summary = engine.train(tiny_config(max_steps=10, evals_per_run=2), *data["train"], *data["val"],
                           out_dir=tmp_path, log=messages.append)
    assert summary["stopped"] == "completed" and summary["iteration"] == 10 and summary["epoch"] == 2
    assert [r["iter"] for r in _rows(tmp_path, "val")] == [5, 10]
    assert any("planned: 10 optimizer steps (train.max_steps" in m for m in messages)
    assert any(m.startswith("warning: only 10 optimizer steps planned") for m in messages)


def test_repeated_samples_are_augmented_apart(data):
    from isda.data import CocoInstanceDataset, build_transforms
    from isda.engine.sampling import SeededSamples

    dataset = CocoInstanceDataset(*data["train"], build_transforms(tiny_config(crop_prob=1.0).data, True))
    samples = SeededSamples(dataset, seed=0, repeats=3)
    assert len(samples) == 3 * len(dataset)
    copies = [samples[i * len(dataset)][0] for i in range(3)]  # image 0, three times
    assert not any(a.shape == b.shape and torch.equal(a, b) for a, b in zip(copies, copies[1:]))
    assert torch.equal(samples[len(dataset)][0], samples[len(dataset)][0])  # still reproducible


def test_time_budget_is_a_target_not_capped_by_epochs(data, tmp_path, monkeypatch):
    # epochs=1 would end after 4 steps; the budget decides instead and the run goes on past the epoch.
    bars = []

    class RecordingBar(isda.engine.trainer.tqdm):
        def update(self, n=1):
            bars.append((self.n + n, self.total))
            return super().update(n)

    monkeypatch.setattr(isda.engine.trainer, "tqdm", RecordingBar)
    messages: list[str] = []
    summary = engine.train(tiny_config(epochs=1, time_budget_s=6.0, evals_per_run=1), *data["train"],
                           out_dir=tmp_path, log=messages.append)
    steps = summary["iteration"]
    assert summary["stopped"] == "time_budget" and steps > 4 and summary["train_time_s"] >= 6.0
    assert any(m.startswith("planned: about ") and "steps in the 6 s budget" in m for m in messages)
    # The progress bar's end is the estimate from the measured rate, not the epochs' 4 steps: near the real end.
    final_total = bars[-1][1]
    assert bars[-1][0] == steps and 0.7 * steps <= final_total <= 1.3 * steps


def test_refusals(data, tmp_path):
    with pytest.raises(ConfigError, match="train.amp"):
        engine.train(tiny_config(amp="fp16"), *data["train"], out_dir=tmp_path / "amp", device="cpu")
    # A checkpoint from a dataset with other categories does not resume.
    engine.train(tiny_config(), *data["train"], out_dir=tmp_path / "run", max_iters=1, log=lambda _m: None)
    ckpt = _load(tmp_path / "run" / "last.pt")
    ckpt["cat_ids"] = [1, 2, 3]
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    with pytest.raises(CheckpointError, match="categories"):
        engine.train(tiny_config(), *data["train"], out_dir=tmp_path / "run", resume=True, log=lambda _m: None)


def test_one_loader_serves_the_whole_run_with_each_epochs_augmentation(data, monkeypatch):
    # A loader per epoch started its workers anew every epoch: on a 3-image dataset, every 3 steps. One iterator
    # must now serve every epoch, with a worker giving exactly the per-epoch, per-index augmentation, and a resumed
    # run (start epoch, batches to skip) must continue where the straight run is.
    from torch.utils.data import DistributedSampler

    from isda.data import CocoInstanceDataset, build_transforms, collate
    from isda.engine import sampling

    dataset = CocoInstanceDataset(*data["train"], build_transforms(tiny_config(crop_prob=1.0).data, True), train=True)
    samples = sampling.SeededSamples(dataset, seed=1)
    sampler = DistributedSampler(samples, num_replicas=1, rank=0, shuffle=True, seed=1)
    batch = 3
    expected = []  # what per-epoch loaders gave: epoch by epoch, the last batch of an epoch short
    for epoch in range(3):
        sampler.set_epoch(epoch)
        samples.set_epoch(epoch)
        order = list(sampler)
        expected += [[samples[i][0] for i in order[s:s + batch]] for s in range(0, len(order), batch)]
    per_epoch = len(expected) // 3
    assert len(samples) % batch != 0  # so that epoch boundaries are tested

    iterators: list[int] = []
    real_iter = sampling.DataLoader.__iter__
    monkeypatch.setattr(sampling.DataLoader, "__iter__", lambda self: iterators.append(1) or real_iter(self))
    batches = sampling.run_batches(samples, sampler, batch, collate, num_workers=1, seed=1)
    for want in expected:
        images, _ = next(batches)
        assert len(images) == len(want) and all(torch.equal(a, b) for a, b in zip(images, want))
    assert len(iterators) == 1
    resumed = sampling.run_batches(samples, sampler, batch, collate, num_workers=0, seed=1, start_epoch=1, skip=1)
    images, _ = next(resumed)
    assert all(torch.equal(a, b) for a, b in zip(images, expected[per_epoch + 1]))


def test_ema_average_follows_its_ramped_recursion_and_skips_nothing():
    """engine.ema: the first update copies the weights, the next ones lerp by 1 - min(decay, (1+n)/(10+n))."""
    from isda.engine.ema import ema_model, ramped_decay

    model = torch.nn.Linear(3, 2)
    model.register_buffer("count", torch.zeros((), dtype=torch.long))
    averaged = ema_model(model, decay=0.9)
    expected = None
    for n in range(30):
        with torch.no_grad():
            model.weight.normal_()
            model.count += 1
        averaged.update_parameters(model)
        w = model.weight.detach().clone()
        expected = w if expected is None else expected + (1 - ramped_decay(0.9, n)) * (w - expected)
    torch.testing.assert_close(averaged.module.weight, expected)
    assert int(averaged.module.count) == 30  # an integer buffer is copied, not averaged
    assert ramped_decay(0.9, 0) == pytest.approx(1 / 10) and ramped_decay(0.9, 1000) == 0.9


def test_ema_run_validates_saves_and_resumes_the_average(data, tmp_path):
    """train.ema_decay: the checkpoint's model is the average (not the trained weights, kept as train_model),
    validation scores it, and resuming mid-run reproduces the uninterrupted run's average exactly."""
    cfg = tiny_config(epochs=3, ema_decay=0.5)
    straight = engine.train(cfg, *data["train"], *data["val"], out_dir=tmp_path / "a", log=lambda _m: None)
    engine.train(cfg, *data["train"], out_dir=tmp_path / "b", max_iters=3, log=lambda _m: None)
    engine.train(cfg, *data["train"], out_dir=tmp_path / "b", resume=True, log=lambda _m: None)
    a, b = _load(tmp_path / "a" / "last.pt"), _load(tmp_path / "b" / "last.pt")
    assert a["ema_updates"] == b["ema_updates"] == straight["iteration"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]) and torch.equal(a["train_model"][key], b["train_model"][key])
    assert any(not torch.equal(a["model"][k], a["train_model"][k]) for k in a["model"])
    # The validation that produced the summary scored the averaged weights.
    model = ISDA(cfg.model).eval()
    from isda.data import CocoInstanceDataset, build_transforms

    val = CocoInstanceDataset(*data["val"], build_transforms(cfg.data, False), train=False)
    def scores(weights: dict) -> list[float]:
        model.load_state_dict(weights)
        _, results = engine.evaluate(model, val, torch.device("cpu"), cfg.train.batch_size, num_workers=0,
                                     window=cfg.data.test_window)
        return sorted(r["score"] for r in results)

    saved = sorted(r["score"] for r in json.loads((tmp_path / "a" / "results_val.json").read_text()))
    assert scores(a["model"]) == pytest.approx(saved, abs=1e-5)
    assert scores(a["train_model"]) != pytest.approx(saved, abs=1e-5)
    # A checkpoint of the other setting is refused with the reason.
    with pytest.raises(CheckpointError, match="ema_decay"):
        engine.train(tiny_config(epochs=4), *data["train"], out_dir=tmp_path / "b", resume=True, log=lambda _m: None)
