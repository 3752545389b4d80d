"""Checkpoints: weights_only round trip, RNG restore, atomic writes, one-line mismatch errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from isda.engine.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
)
from isda.models.isda import ISDA

from engine_utils import tiny_config


def _model(**overrides) -> ISDA:
    cfg = tiny_config(**overrides)
    torch.manual_seed(0)
    return ISDA(cfg.model, cfg.loss)


def _draws() -> tuple:
    return random.random(), np.random.rand(), torch.rand(3), random.gauss(0, 1), np.random.randn()


def test_round_trip_with_weights_only(tmp_path):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    model.head.class_embed.weight.sum().backward()
    optimizer.step()
    random.gauss(0, 1)  # leaves a cached Gaussian in the Python state
    cfg = tiny_config()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": capture_rng_state(),
             "config": cfg.to_dict(), "class_names": ["a", "b"], "epoch": 3, "best_ap": None}
    save_checkpoint(state, tmp_path / "ck.pt")

    expected = _draws()
    loaded = torch.load(tmp_path / "ck.pt", weights_only=True)  # no pickled code needed
    assert loaded["config"]["train"]["lr"] == cfg.train.lr and loaded["epoch"] == 3
    restore_rng_state(loaded["rng"])
    again = _draws()
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2]) and again[3:] == expected[3:]

    fresh = _model()
    load_model_state(fresh, load_checkpoint(tmp_path / "ck.pt")["model"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["optimizer"])
    restored = opt2.state_dict()["state"]
    assert restored and all(float(s["step"]) == 1 for s in restored.values())


def test_failed_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")  # half a file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_mismatched_architecture_or_class_count_is_a_one_line_error(tmp_path):
    save_checkpoint({"model": _model().state_dict()}, tmp_path / "ck.pt")
    state = load_checkpoint(tmp_path / "ck.pt")["model"]
    shapes = r"head\.class_embed\.weight is \(5, 64\) in the checkpoint, \(7, 64\) in the model"
    with pytest.raises(CheckpointError, match=shapes) as err:
        load_model_state(_model(num_classes=7), state, source="ck.pt")
    assert "\n" not in str(err.value)
    # a decoder layer: 22 tensors, + 6 of its point-refinement MLP (the tiny preset's model.refine_points)
    keys = r"different architecture\): 28 missing and 0 unexpected keys, e\.g\. missing 'transformer\.decoder\.2"
    with pytest.raises(CheckpointError, match=keys) as err:
        load_model_state(_model(dec_layers=3), state, source="ck.pt")
    assert "\n" not in str(err.value)


def test_unreadable_files_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"model": {"w": torch.ones(1)}, "extra": object()}, tmp_path / "code.pt")  # needs unpickling code
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "code.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not an isda checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
