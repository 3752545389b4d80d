"""NMS-free post-processing: boxes from masks, mask upsampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import masks_to_boxes

import isda
from isda.models.isda import mask_boxes


def test_boxes_equal_masks_to_boxes():
    masks = torch.rand(40, 33, 47, generator=torch.Generator().manual_seed(0)) > 0.97
    masks[1] = False
    masks[2] = False
    masks[2, 32, 46] = True  # one pixel in the last corner
    want = torch.zeros(40, 4)
    nonempty = masks.flatten(1).any(1)
    want[nonempty] = masks_to_boxes(masks[nonempty]).float()
    assert torch.equal(mask_boxes(masks), want)
    assert mask_boxes(masks[:0]).shape == (0, 4)


@pytest.mark.parametrize("image_size,output_size", [((61, 90), (61, 90)), ((61, 90), (40, 57))])
def test_upsample_masks_equals_upsampling_all_at_once(image_size, output_size):
    """Chunked, thresholded into the output == every mask upsampled, cropped, resized and thresholded at once."""
    torch.manual_seed(0)
    model = isda.build_model("isda_tiny", num_classes=3)
    s = model.cfg.mask_stride  # the mask logits of a 64x96 padded batch
    probs = torch.rand(7, 64 // s, 96 // s, generator=torch.Generator().manual_seed(0))
    h, w = image_size
    want = F.interpolate(probs[:, None], scale_factor=model.cfg.mask_stride, mode="bilinear",
                         align_corners=False)[:, :, :h, :w]
    if image_size != output_size:
        want = F.interpolate(want, size=output_size, mode="bilinear", align_corners=False)
    assert torch.equal(model.upsample_masks(probs, image_size, output_size, chunk=3),
                       want[:, 0] > model.cfg.mask_threshold)
