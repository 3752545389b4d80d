"""Configuration: the paper preset's recipe is pinned; YAML round trip; overrides; clear errors."""

import pytest

from isda.config import ConfigError, apply_overrides, get_preset, load_config, save_config


def test_paper_preset_is_the_official_recipe():
    cfg = get_preset("isda_r50_coco")
    loss, train, data, model = cfg.loss, cfg.train, cfg.data, cfg.model
    assert (loss.focal_alpha, loss.focal_gamma, loss.class_weight, loss.dice_weight) == (0.25, 2.0, 2.0, 3.0)
    assert (loss.match_class_cost, loss.match_mask_cost, loss.aux_loss) == (2.0, 3.0, True)
    assert (train.lr, train.weight_decay, train.lr_backbone_mult, train.lr_linear_proj_mult) == (1.25e-4, 1e-4, 0.1, 0.1)
    assert (train.clip_max_norm, train.epochs, train.lr_gamma) == (0.1, 42, 0.1)
    assert [round(f * 42, 9) for f in train.lr_drops] == [27, 33, 35, 36, 37]  # epochs of 42
    assert data.train_short_sides == tuple(range(480, 801, 32)) and data.train_max_size == 1333
    assert (data.crop_resize_short_sides, data.crop_size, data.crop_prob, data.flip_prob) == ((400, 500, 600), (384, 600), 0.5, 0.5)
    assert (data.test_short_side, data.test_max_size) == (800, 1333)
    assert (model.backbone, model.backbone_norm, model.frozen_stages) == ("resnet50", "frozen_bn", 1)
    assert (model.mask_position, model.kernel_position, model.mask_stride) == (True, True, 4)
    # The convergence levers are switches, off in the paper's recipe.
    assert (model.query_selection, model.hybrid_queries, model.refine_points, model.num_queries) == (False, 0, False, 300)
    assert model.denoising_groups == 0
    assert (loss.mask_bce_weight, loss.class_loss) == (0.0, "focal")


def test_yaml_round_trip_and_preset_base(tmp_path):
    cfg = apply_overrides(get_preset("isda_tiny"), {"train.lr": "3e-4", "mask_stride": "8", "train_short_sides": "96,128"})
    save_config(cfg, tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml")
    assert back == cfg and back.train.lr == 3e-4 and back.model.mask_stride == 8
    assert back.data.train_short_sides == (96, 128)
    (tmp_path / "p.yaml").write_text("preset: isda_tiny\ntrain:\n  batch_size: 2\n")
    small = load_config(tmp_path / "p.yaml")
    assert small.model.backbone == "resnet18" and small.train.batch_size == 2


@pytest.mark.parametrize("overrides,match", [
    ({"train.nope": 1}, "unknown config key 'train.nope'"),
    ({"nope": 1}, "unknown config key 'nope'"),
    ({"optim.lr": 1}, "unknown config key 'optim.lr'"),
    ({"train.epochs": "many"}, "train.epochs"),
    ({"train.epochs": "2.5"}, "expected an integer"),
    ({"model.mask_position": "maybe"}, "true/false"),
])
def test_bad_overrides_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(get_preset("isda_tiny"), overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "stride.yaml").write_text("model:\n  mask_stride: 3\n")
    with pytest.raises(ConfigError, match="model.mask_stride"):
        load_config(tmp_path / "stride.yaml")
    (tmp_path / "window.yaml").write_text("data:\n  test_window: 20\n")
    with pytest.raises(ConfigError, match="data.test_window.*at least 32 px, got 20"):
        load_config(tmp_path / "window.yaml")
