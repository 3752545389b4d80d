"""``isda predict --tile``: window layout, the core merge rule against an oracle predictor, the CLI end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from engine_utils import single_thread, tiny_config
from isda.cli import main
from isda.data.rle import decode_rle
from isda.tiling import draw_tiled, predict_in_windows, predict_tiled, tile_windows


@pytest.mark.parametrize("height, width, size, overlap", [
    (700, 900, 256, 64), (100, 100, 256, 64), (50, 300, 64, 16), (64, 64, 64, 16), (65, 129, 64, 0),
    (333, 517, 100, 99), (1000, 37, 32, 7),
])
def test_windows_cover_the_image_and_cores_partition_it(height, width, size, overlap):
    windows = tile_windows(height, width, size, overlap)
    covered = np.zeros((height, width), int)
    cores = np.zeros((height, width), int)
    for w in windows:
        assert 0 <= w.y0 < w.y1 <= height and 0 <= w.x0 < w.x1 <= width
        assert (w.y1 - w.y0, w.x1 - w.x0) == (min(size, height), min(size, width))
        assert w.y0 <= w.cy0 < w.cy1 <= w.y1 and w.x0 <= w.cx0 < w.cx1 <= w.x1  # a core lies in its window
        covered[w.y0:w.y1, w.x0:w.x1] += 1
        cores[w.cy0:w.cy1, w.cx0:w.cx1] += 1
    assert covered.min() >= 1
    assert (cores == 1).all()  # every pixel in exactly one core
    if height <= size and width <= size:
        assert len(windows) == 1


def test_bad_tile_arguments():
    for size, overlap in [(31, 0), (64, 64), (64, -1)]:
        with pytest.raises(ValueError):
            tile_windows(100, 100, size, overlap)


# ---------------------------------------------------------------------------------------------------
# The merge rule, with an oracle for a predictor

H, W, TILE, OVERLAP = 700, 900, 256, 64  # blobs of 10-30 px: smaller than half the overlap


def blob_image(seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Disjoint blobs (ellipses, some with a notch) of 10-30 px: a float [3, H, W] image (channel 0: foreground,
    channel 1: the blob id / 255) and the id map. Some are centred on window edges and core boundaries (and
    their crossings), where a wrong merge keeps a cut or a repeated copy."""
    rng = np.random.default_rng(seed)
    windows = tile_windows(H, W, TILE, OVERLAP)
    lines_y = sorted({v for w in windows for v in (w.y0, w.y1, w.cy0, w.cy1)} - {0, H})
    lines_x = sorted({v for w in windows for v in (w.x0, w.x1, w.cx0, w.cx1)} - {0, W})
    centres = [(y, float(rng.uniform(20, W - 20))) for y in lines_y] + \
              [(float(rng.uniform(20, H - 20)), x) for x in lines_x] + \
              [(y, x) for y, x in zip(lines_y, lines_x)]
    centres += [(float(rng.uniform(20, H - 20)), float(rng.uniform(20, W - 20))) for _ in range(200)]
    ids = np.zeros((H, W), np.int32)
    yy, xx = np.mgrid[0:H, 0:W]
    taken = np.zeros((H, W), bool)
    n = 0
    for cy, cx in centres:
        if n == 40:
            break
        ry, rx = rng.uniform(5, 15, 2)
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        if n % 3 == 0:  # a notch: not convex, centroid off the box centre
            blob &= ~((yy > cy) & (xx > cx))
        halo = ndimage.binary_dilation(blob, iterations=2)
        if blob.sum() < 20 or (halo & taken).any():
            continue
        n += 1
        ids[blob] = n
        taken |= halo
    image = torch.zeros(3, H, W)
    image[0] = torch.from_numpy(ids > 0).float()
    image[1] = torch.from_numpy(ids).float() / 255
    return image, ids


def oracle(window: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detects the connected components of the window (a blob cut by the window's edge: its visible part),
    score and label from the blob id."""
    components, count = ndimage.label(window[0].numpy() > 0.5)
    masks = torch.from_numpy(components[None] == np.arange(1, count + 1)[:, None, None])
    blob_ids = torch.stack([(window[1][m] * 255).round().max() for m in masks]) if count else torch.zeros(0)
    return {"scores": 1 - blob_ids / 100, "labels": blob_ids.long() % 3, "masks": masks}


def test_every_blob_exactly_once_with_its_full_mask():
    image, ids = blob_image()
    count = int(ids.max())
    assert count == 40
    tiled = predict_tiled(oracle, image, TILE, OVERLAP, score_thr=0.0)
    assert tiled.num_windows == len(tile_windows(H, W, TILE, OVERLAP)) == 20
    assert len(tiled) == count
    found = (100 * (1 - tiled.scores)).round().long().tolist()  # the oracle's scores carry the blob ids
    assert sorted(found) == list(range(1, count + 1))  # each blob once, no duplicates
    assert tiled.scores.tolist() == sorted(tiled.scores.tolist(), reverse=True)
    masks = tiled.masks()
    for blob_id, mask, label in zip(found, masks, tiled.labels.tolist()):
        assert torch.equal(mask, torch.from_numpy(ids == blob_id))  # IoU 1.0
        assert label == blob_id % 3
    # The results entries (RLE written from the crops) decode to the same masks at the image's size.
    entries = tiled.coco_results(7, cat_ids=[1, 2, 3])
    decoded = decode_rle([e["segmentation"] for e in entries]).transpose(2, 0, 1)
    assert decoded.shape == (count, H, W)
    assert np.array_equal(decoded.astype(bool), masks.numpy())
    assert [e["category_id"] for e in entries] == [lab + 1 for lab in tiled.labels.tolist()]
    assert entries[0]["bbox"] == [float(v) for v in mask_utils.toBbox(entries[0]["segmentation"])]


def test_without_the_core_rule_blobs_would_be_repeated_or_cut():
    """The layout above is a real test of the rule: kept from every window, blobs come back several times
    (whole in two windows' overlap) and as cut pieces (at a window's edge)."""
    image, ids = blob_image()
    whole, cut = 0, 0
    for w in tile_windows(H, W, TILE, OVERLAP):
        pred = oracle(image[:, w.y0:w.y1, w.x0:w.x1])
        for mask, score in zip(pred["masks"], pred["scores"]):
            blob = ids == round(100 * (1 - float(score)))
            if mask.sum() == blob.sum():
                whole += 1
            else:
                cut += 1
    assert whole > int(ids.max()) + 10 and cut > 10


def test_a_small_image_is_one_window():
    image, ids = blob_image()
    small = image[:, :200, :150]
    tiled = predict_tiled(oracle, small, TILE, OVERLAP, score_thr=0.0)
    assert tiled.num_windows == 1
    expected = oracle(small)
    assert len(tiled) == len(expected["masks"])
    assert torch.equal(tiled.masks()[torch.argsort(tiled.scores, descending=True)],
                       expected["masks"][torch.argsort(expected["scores"], descending=True)])


def test_score_threshold_and_scaled_masks():
    image, ids = blob_image()
    tiled = predict_tiled(oracle, image, TILE, OVERLAP, score_thr=0.9)  # blob ids <= 10
    assert len(tiled) == 10 and (tiled.scores >= 0.9).all()
    half = tiled.masks(scale=0.5)
    assert half.shape == (10, H // 2, W // 2)
    assert half.flatten(1).any(1).all()


def test_overlay_is_drawn_smaller_past_the_mask_budget(monkeypatch):
    import isda.tiling

    image, ids = blob_image()
    tiled = predict_tiled(oracle, image, TILE, OVERLAP, score_thr=0.9)
    pixels = (image * 255).round().to(torch.uint8)
    assert draw_tiled(pixels, tiled, ["a", "b", "c"], 0.9).shape == (3, H, W)
    monkeypatch.setattr(isda.tiling, "DRAW_MASK_PIXELS", len(tiled) * H * W // 4)
    assert draw_tiled(pixels, tiled, ["a", "b", "c"], 0.9).shape == (3, 384, 494)  # half size, then display size


# ---------------------------------------------------------------------------------------------------
# The CLI


@pytest.fixture(scope="module")
def checkpoint(module_dir):
    """A tiny untrained model saved as a training checkpoint: no training needed to exercise predict."""
    from isda.engine.checkpoint import save_checkpoint
    from isda.models.isda import ISDA

    cfg = tiny_config()
    torch.manual_seed(0)
    model = ISDA(cfg.model, cfg.loss)
    path = module_dir / "best.pt"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(),
                     "class_names": [f"c{i}" for i in range(cfg.model.num_classes)],
                     "cat_ids": list(range(1, cfg.model.num_classes + 1))}, path)
    return path


def test_predict_tile_end_to_end(checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(0)
    img = tmp_path / "big.png"
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "pred"
    with single_thread():
        assert main(["predict", "--weights", str(checkpoint), str(img), "--tile", "64", "--out", str(out),
                     "--score-thr", "0.0", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    windows = len(tile_windows(200, 300, 64, 16))
    assert f"{img}: {windows} windows, " in printed
    results = json.loads((out / "results.json").read_text())
    assert results, "an untrained model at threshold 0 still detects something"
    assert f"{windows} windows, {len(results)} instances" in printed
    masks = decode_rle([r["segmentation"] for r in results])
    assert masks.shape[:2] == (200, 300) and masks.any((0, 1)).all()
    assert {r["image_id"] for r in results} == {0}
    with Image.open(out / "big_pred.png") as im:
        assert im.size == (576, 384)  # drawn at the display size, like a whole-image prediction


@pytest.mark.parametrize("extra, needle", [
    (["--tile", "16"], "--tile must be >= 32"),
    (["--tile", "64", "--tile-overlap", "64"], "--tile-overlap must be >= 0 and < --tile"),
    (["--tile", "64", "--tile-overlap", "-1"], "--tile-overlap must be >= 0 and < --tile"),
    (["--tile-overlap", "8"], "--tile-overlap goes with --tile"),
    (["--tile", "64", "--show-reference-points"], "not with --tile"),
])
def test_bad_tile_values_are_one_line_errors(checkpoint, tmp_path, capsys, extra, needle):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)
    assert main(["predict", "--weights", str(checkpoint), str(img), "--out", str(tmp_path / "o"), *extra]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], lines


# ---------------------------------------------------------------------------------------------------
# A model trained on crops (data.test_window) predicts window by window at its test scale

class WindowModel:
    """The oracle as a model: ``model(images, output_sizes=None)``, each image's detections padded with empty,
    zero-score ones to ``budget`` (as a model returns its top-k), masks at the output size; records input sizes."""

    def __init__(self, budget: int) -> None:
        self.budget, self.inputs = budget, []

    def __call__(self, images, output_sizes=None):
        out = []
        for image, size in zip(images, output_sizes or [tuple(im.shape[1:]) for im in images]):
            self.inputs.append(tuple(image.shape[1:]))
            pred = oracle(image)
            pad = self.budget - len(pred["scores"])
            masks = torch.cat([pred["masks"], torch.zeros(pad, *image.shape[1:], dtype=torch.bool)])
            masks = torch.nn.functional.interpolate(masks[None].float(), size=size, mode="nearest")[0] > 0.5
            out.append({"scores": torch.cat([pred["scores"], torch.zeros(pad)]),
                        "labels": torch.cat([pred["labels"], torch.zeros(pad, dtype=torch.long)]), "masks": masks})
        return out


def test_a_model_trained_on_crops_sees_only_windows_of_their_size():
    image, ids = blob_image()
    model = WindowModel(budget=60)
    (pred,) = predict_in_windows(model, [image], [(H // 2, W // 2)], window=TILE)
    assert model.inputs and all(h <= TILE and w <= TILE for h, w in model.inputs)
    assert len(model.inputs) == len(tile_windows(H, W, TILE, TILE // 2))  # overlapping by half a window
    found = (100 * (1 - pred["scores"])).round().long().tolist()
    assert sorted(found) == list(range(1, 41))  # every blob once
    assert pred["masks"].shape == (40, H // 2, W // 2) and pred["boxes"].shape == (40, 4)
    half = torch.nn.functional.interpolate(torch.from_numpy(ids)[None, None].float(), size=(H // 2, W // 2),
                                           mode="nearest")[0, 0].long()
    for blob_id, mask in zip(found, pred["masks"]):
        truth = half == blob_id
        assert (mask & truth).sum() / (mask | truth).sum() > 0.7  # the blob, resized to the output size
    # At most the model's own budget per image, the best ones.
    (capped,) = predict_in_windows(WindowModel(budget=25), [image], [(H, W)], window=TILE)
    assert torch.equal(capped["scores"], pred["scores"][:25])
    # An image within one window is predicted whole, once, at the output size asked for.
    small = WindowModel(budget=60)
    (whole,) = predict_in_windows(small, [image[:, :TILE, :TILE - 6]], [(100, 90)], window=TILE)
    assert small.inputs == [(TILE, TILE - 6)] and whole["masks"].shape[1:] == (100, 90)


def test_predict_runs_the_network_on_windows_when_the_config_says_so():
    """isda.inference.predict with data.test_window: the network sees nothing larger than the window, masks
    come back at the image's own size."""
    from isda.inference import predict
    from isda.models import ISDA

    cfg = tiny_config()
    cfg.data.test_short_side, cfg.data.test_max_size, cfg.data.test_window = 256, 256, 128
    torch.manual_seed(0)
    model = ISDA(cfg.model, cfg.loss).eval()
    seen = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0][0].shape[1:])))
    with single_thread():
        (pred,) = predict(model, cfg.data, [torch.rand(3, 150, 200)])
    # 150 x 200 at the test size: 192 x 256 (long side capped), six windows of 128 px
    assert len(seen) == len(tile_windows(192, 256, 128, 64)) == 6 and all(max(s) <= 128 for s in seen)
    assert pred["masks"].shape[1:] == (150, 200) and len(pred["scores"]) == cfg.model.num_detections
    # Drawn as any prediction (windows have no per-query points to draw).
    from isda.inference import predict_and_draw

    with single_thread():
        _, drawn = predict_and_draw(model, cfg.data, (255 * torch.rand(3, 150, 200)).to(torch.uint8), ["a"] * 5,
                                    sampling_points=True)
    assert drawn.shape[0] == 3 and drawn.shape[1] * 200 == drawn.shape[2] * 150 and drawn.dtype == torch.uint8
