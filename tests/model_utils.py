"""Tiny models and one toy batch, shared by the model tests."""

from __future__ import annotations

import torch

import isda


def tiny(**overrides) -> torch.nn.Module:
    """The tiny preset with 3 classes, seeded: two calls with the same overrides build the same weights."""
    torch.manual_seed(0)
    return isda.build_model("isda_tiny", num_classes=3, **overrides)


def batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two random images (96x128 and 128x96) with one and two box-shaped instances."""
    torch.manual_seed(1)
    images = [torch.rand(3, 96, 128), torch.rand(3, 128, 96)]
    targets = []
    for im, boxes in zip(images, ([(5, 40, 10, 50), (50, 90, 60, 120)], [(20, 100, 30, 80)])):
        masks = torch.zeros(len(boxes), *im.shape[1:], dtype=torch.bool)
        for m, (y0, y1, x0, x1) in zip(masks, boxes):
            m[y0:y1, x0:x1] = True
        targets.append({"labels": torch.arange(len(boxes)), "masks": masks})
    return images, targets


def train_one_step(model: torch.nn.Module) -> torch.nn.Module:
    """One AdamW step on :func:`batch` (so that a training-only part has moved the shared weights)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()(*batch())["loss"].backward()
    optimizer.step()
    return model


def assert_same_predictions(a: torch.nn.Module, b: torch.nn.Module, exact: bool = True) -> list[dict]:
    """Both models in eval mode predict the same outputs on :func:`batch`'s images (bit for bit when ``exact``);
    returns ``a``'s outputs."""
    images = batch()[0]
    with torch.no_grad():
        out_a, out_b = a.eval()(images), b.eval()(images)
    for x, y in zip(out_a, out_b, strict=True):
        assert set(x) == set(y)
        for key in x:
            torch.testing.assert_close(x[key], y[key], **({"rtol": 0, "atol": 0} if exact else {}))
    return out_a
