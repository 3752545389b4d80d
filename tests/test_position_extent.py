"""``model.position_extent_px`` (opt-in): positions measured in pixels instead of relative to each image. The encoder's
sine encoding, MP's coordinates and KP's weights of a pixel are the same in an N px crop and in the larger whole
image it was cut from (the paper's are not), and are the paper's own over an image of exactly the extent; the model
trains with it, and its ONNX export predicts what PyTorch predicts."""

import pytest
import torch

import isda
from isda.config import ConfigError, apply_overrides, get_preset
from isda.deploy.onnx_export import export_model, isda_metadata
from isda.deploy.runtime import OnnxISDA
from isda.models.mask_features import coordinate_map
from isda.models.position_encoding import sine_position_encoding

from engine_utils import generated_images
from model_utils import tiny, train_one_step
from test_overfit import mean_best_iou

pytestmark = pytest.mark.usefixtures("one_thread")


def padding(height: int, width: int, padded: tuple[int, int]) -> torch.Tensor:
    mask = torch.ones(1, *padded, dtype=torch.bool)
    mask[:, :height, :width] = False
    return mask


def test_encodings_of_a_crop_are_those_of_the_whole_image_it_comes_from():
    crop, whole = padding(8, 8, (8, 8)), padding(14, 20, (16, 24))  # a 64 px crop and a 112 x 160 image, 1/8 maps
    extent = 8.0  # cells: a 64 px extent at stride 8
    pos_crop, pos_whole = sine_position_encoding(crop, 16, extent=extent), sine_position_encoding(whole, 16, extent=extent)
    torch.testing.assert_close(pos_whole[..., :8, :8], pos_crop, rtol=0, atol=1e-5)
    coords_crop, coords_whole = coordinate_map(crop, extent), coordinate_map(whole, extent)
    torch.testing.assert_close(coords_whole[..., :8, :8], coords_crop, rtol=0, atol=1e-6)
    # The paper's encodings are relative to each image: the same pixels get other values in the whole image.
    assert not torch.allclose(sine_position_encoding(whole, 16)[..., :8, :8], sine_position_encoding(crop, 16), atol=1e-2)
    assert not torch.allclose(coordinate_map(whole)[..., :8, :8], coordinate_map(crop), atol=1e-2)
    # Over an image of exactly the extent, they are the paper's.
    torch.testing.assert_close(sine_position_encoding(crop, 16, extent=extent), sine_position_encoding(crop, 16),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(coordinate_map(crop, extent), coordinate_map(crop), rtol=0, atol=1e-6)


def test_kernel_position_weights_depend_on_the_pixel_not_the_image_size():
    model = isda.build_model("isda_tiny", num_classes=2, **{"model.position_extent_px": 64})
    hidden = torch.zeros(1, 2, 1, model.cfg.hidden_dim)
    pixel = torch.tensor([40.0, 24.0])  # (x, y) in px, in a 64 px crop and in a 160 x 112 image
    sizes = torch.tensor([[64.0, 64.0], [160.0, 112.0]])
    points = (pixel / sizes)[None, :, None]  # (layers, B, Q, 2) in [0, 1] of each image
    kp = model.head.kernels(hidden, points, sizes / 64)[..., -2:]
    torch.testing.assert_close(kp[0, 0], kp[0, 1])
    torch.testing.assert_close(kp[0, 0, 0], 2 * pixel / 64 - 1)


def test_the_model_records_each_images_size_in_extents():
    model = isda.build_model("isda_tiny", num_classes=2, **{"model.position_extent_px": 64}).eval()
    with torch.no_grad():
        out = model.forward_features(*model.batch_images([torch.rand(3, 96, 128), torch.rand(3, 64, 80)]))
    torch.testing.assert_close(out["point_scale"], torch.tensor([[2.0, 1.5], [1.25, 1.0]]))


def test_bad_values_name_the_field():
    for value in (-1, 16):
        with pytest.raises(ConfigError, match="model.position_extent_px"):
            apply_overrides(get_preset("isda_tiny"), {"model.position_extent_px": value}).validate()
    with pytest.raises(ConfigError, match="model.position_extent_px"):
        apply_overrides(get_preset("isda_tiny"), {"model.position_extent_px": 64, "model.denoising_groups": 2}).validate()


def test_trains_on_generated_images():
    torch.manual_seed(0)
    images, targets = generated_images()  # 128 px: twice the extent
    model = isda.build_model("isda_tiny", num_classes=5, **{"model.position_extent_px": 64})
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    model.eval()
    with torch.no_grad():
        before = mean_best_iou(model(images), targets)
    model.train()
    first = None
    for _ in range(15):
        losses = model(images, targets)
        first = first or losses["loss_dice"].item()
        optimizer.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
    assert losses["loss_dice"].item() < 0.2 * first
    model.eval()
    with torch.no_grad():
        after = mean_best_iou(model(images), targets)
    assert after > before + 0.4


def test_onnx_export_predicts_what_pytorch_predicts(tmp_path):
    switch = {"model.position_extent_px": 64}
    model = train_one_step(tiny(**switch)).eval()
    cfg = apply_overrides(get_preset("isda_tiny"), {**switch, "model.num_classes": 3})
    export_model(model, tmp_path / "model.onnx", isda_metadata(cfg), size=(70, 90))
    onnx_model = OnnxISDA(tmp_path / "model.onnx", threads=1)
    image = torch.rand(3, 100, 150)  # another size than the trace's
    with torch.no_grad():
        (ref,) = model([image])
    (out,) = onnx_model([image])
    assert torch.equal(out["query_index"][:10], ref["query_index"][:10])
    torch.testing.assert_close(out["scores"], ref["scores"], atol=1e-4, rtol=0)
