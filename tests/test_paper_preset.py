"""The paper preset never trains silently into garbage: a frozen (FrozenBatchNorm, stem + stage 1) ResNet-50 with
random weights never learns, so training it without weights stops with one line naming what to pass, unless the
user asks to train from scratch (BatchNorm, nothing frozen, recorded in the run's config)."""

import pytest
import yaml

from engine_utils import single_thread
from isda import engine
from isda.cli import main
from isda.config import ConfigError, apply_from_scratch, get_preset, require_backbone_init
from isda.data.shapes import make_shapes_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_preset")
    make_shapes_dataset(root, num_train=2, num_val=1, image_size=64, seed=0)
    return root


def test_cli_refuses_the_paper_preset_without_weights(data, tmp_path, capsys):
    code = main(["train", "--preset", "isda_r50_coco", "--data", str(data), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    for hint in ("--init", "isda convert", "model.backbone_weights", "torchvision", "--from-scratch"):
        assert hint in err, hint
    assert not (tmp_path / "run" / "last.pt").exists()


def test_engine_refuses_a_frozen_random_backbone(data, tmp_path):
    with pytest.raises(ConfigError, match="model.backbone_weights"):
        engine.train(get_preset("isda_r50_coco"), data / "annotations" / "instances_train.json", data / "train",
                     out_dir=tmp_path, log=lambda _m: None)
    # Frozen stages alone (trainable BatchNorm) are refused too; either source of weights is enough.
    cfg = get_preset("isda_tiny")
    cfg.model.frozen_stages = 1
    with pytest.raises(ConfigError, match="frozen_stages=1"):
        require_backbone_init(cfg, None)
    require_backbone_init(cfg, "init.pth")
    cfg.model.backbone_weights = "resnet18.pth"
    require_backbone_init(cfg, None)
    require_backbone_init(get_preset("isda_tiny"), None)  # BatchNorm, nothing frozen: from scratch by design


def test_from_scratch_switches_the_backbone_and_the_config_says_so(data, tmp_path):
    with single_thread():
        assert main(["train", "--preset", "isda_r50_coco", "--from-scratch", "--data", str(data), "--val-split", "",
                     "--out", str(tmp_path / "run"), "--max-iters", "0",
                     "--set", "data.train_short_sides=64", "--set", "data.crop_prob=0"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    assert (saved["from_scratch"], saved["backbone_norm"], saved["frozen_stages"]) == (True, "bn", 0)
    assert saved["backbone"] == "resnet50" and saved["backbone_weights"] is None


def test_from_scratch_contradicting_fields_name_the_field():
    cfg = apply_from_scratch(get_preset("isda_r50_coco"))
    cfg.model.backbone_norm = "frozen_bn"
    with pytest.raises(ConfigError, match="model.from_scratch"):
        cfg.validate()
    cfg = apply_from_scratch(get_preset("isda_r50_coco"))
    cfg.model.backbone_weights = "resnet50.pth"
    with pytest.raises(ConfigError, match="model.from_scratch"):
        cfg.validate()
