"""Faster-convergence options of the model and losses: query selection, hybrid (one-to-many) matching, point
refinement, query denoising and the varifocal class loss. Each lever's training path runs and reaches its parameters; the
training-only levers leave inference unchanged."""

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from isda.config import LossConfig
from isda.models.losses import SetCriterion, mask_centroids, varifocal_loss

from model_utils import assert_same_predictions, batch, tiny


@pytest.mark.parametrize("levers", [{"query_selection": True}, {"hybrid_queries": 40},
                                    {"query_selection": True, "hybrid_queries": 40}, {"refine_points": True},
                                    {"refine_points": True, "hybrid_queries": 40}, {"denoising_groups": 3},
                                    {"denoising_groups": 3, "hybrid_queries": 40, "refine_points": True}])
def test_lever_training_path_runs_and_reaches_its_parameters(levers):
    model = tiny(**levers).train()
    losses = model(*batch())
    names = set(losses)
    if levers.get("hybrid_queries"):
        assert {"h.loss_cls", "h.loss_dice", "h.d0.loss_cls", "h.d0.loss_dice"} <= names
    if levers.get("query_selection"):
        assert "enc.loss_cls" in names
    if levers.get("denoising_groups"):
        assert {"dn.loss_cls", "dn.loss_dice", "dn.d0.loss_dice"} <= names
        assert ("dn.loss_point" in names) == model.cfg.refine_points
    if levers.get("refine_points"):
        assert {"loss_point", "d0.loss_point"} <= names and ("h.loss_point" in names) == bool(levers.get("hybrid_queries"))
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    t = model.transformer
    embed = t.query_content.weight if levers.get("query_selection") else t.query_embed.weight
    rows = embed.grad.abs().sum(1)
    assert (rows > 0).all()  # one-to-one and (when on) the one-to-many queries all get gradient
    if levers.get("query_selection"):
        assert t.query_selection.class_embed.weight.grad.abs().sum() > 0
    if levers.get("refine_points"):
        assert all(mlp[-1].weight.grad.abs().sum() > 0 for mlp in t.point_refine)
    if levers.get("denoising_groups"):
        assert all(p.grad.abs().sum() > 0 for p in model.denoising.parameters())


@pytest.mark.parametrize("query_selection", [False, True])
def test_hybrid_queries_leave_inference_unchanged(query_selection):
    """A model trained with one-to-many queries predicts exactly what the same weights predict without them."""
    hybrid = tiny(query_selection=query_selection, hybrid_queries=40).train()
    hybrid(*batch())["loss"].backward()  # training builds the one-to-one queries and the 40 hybrid ones
    plain = tiny(query_selection=query_selection)
    queries = plain.cfg.num_queries
    state = hybrid.state_dict()
    name = "transformer.query_content.weight" if query_selection else "transformer.query_embed.weight"
    assert state[name].shape[0] == queries + hybrid.cfg.hybrid_queries
    state[name] = state[name][:queries]
    plain.load_state_dict(state)
    for x in assert_same_predictions(hybrid, plain):
        assert set(x) == {"scores", "labels", "masks", "boxes", "query_index", "reference_points"}
        assert int(x["query_index"].max()) < queries


def test_query_selection_puts_reference_points_on_the_top_scoring_tokens():
    model = tiny(query_selection=True).eval()
    images = [torch.rand(3, 128, 96)]
    with torch.no_grad():
        out = model.forward_features(*model.batch_images(images))
    score = out["enc_logits"][0].amax(-1)
    top = score.topk(model.cfg.num_queries).indices
    ratios = out["valid_ratios"][0]
    shapes = out["spatial_shapes"].tolist()
    level = torch.repeat_interleave(torch.arange(4), torch.tensor([h * w for h, w in shapes]))
    expected = out["token_centers"][top] / ratios[level[top]]  # valid-region coordinates
    torch.testing.assert_close(out["reference_points"][0], expected.clamp(0, 1))


def test_query_selection_handles_maps_smaller_than_the_query_count():
    model = tiny(query_selection=True).eval()  # a 32 px image has 4 + 1 + 1 + 1 tokens, fewer than the queries
    with torch.no_grad():
        (pred,) = model([torch.rand(3, 32, 32)])
    assert pred["masks"].shape == (50, 32, 32)


def test_encoder_loss_marks_tokens_inside_masks_positive():
    criterion = SetCriterion(LossConfig())
    centers = torch.tensor([[0.25, 0.25], [0.75, 0.75], [0.25, 0.75], [0.75, 0.25]])
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # top-left quadrant: holds token 0's centre only
    logits = torch.randn(1, 4, 3)
    padding = torch.tensor([[False, False, False, True]])  # token 3 is padding: no loss
    loss = criterion.encoder_loss(logits, centers, padding, [{"labels": torch.tensor([2])}], [masks])
    target = torch.zeros(3, 3)
    target[0, 2] = 1.0
    expected = sigmoid_focal_loss(logits[0, :3], target, 0.25, 2.0, reduction="sum") / 1.0
    torch.testing.assert_close(loss, expected)


def test_point_refinement_starts_as_the_paper_model_and_learns_the_centroids():
    """Its corrections start at zero: at initialisation the model predicts what the paper's model with the same
    weights predicts (up to sigmoid(logit(x)) rounding). Trained on one batch, its points move onto the
    instances' mask centroids."""
    refine, plain = tiny(refine_points=True), tiny(refine_points=False)
    plain.load_state_dict({k: v for k, v in refine.state_dict().items() if "point_refine" not in k})
    assert_same_predictions(refine, plain, exact=False)
    images, targets = batch()
    refine.train()
    optimizer = torch.optim.AdamW(refine.parameters(), lr=1e-3)
    first = None
    for _ in range(25):
        losses = refine(images, targets)
        first = first if first is not None else losses["loss_point"].item()
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert losses["loss_point"].item() < 0.5 * first


def test_point_loss_is_the_l1_distance_of_the_matched_query_to_the_centroid():
    criterion = SetCriterion(LossConfig(aux_loss=False))
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, 2:] = 1.0  # top-right quadrant: centroid (0.75, 0.25)
    mask_logits = torch.full((1, 1, 3, 4, 4), -10.0)
    mask_logits[0, 0, 1] = mask[0] * 20 - 10  # query 1 predicts the mask exactly: the matcher picks it
    points = torch.tensor([[[[0.5, 0.5], [0.7, 0.4], [0.75, 0.25]]]])
    target = mask_centroids(mask.bool())
    torch.testing.assert_close(target, torch.tensor([[0.75, 0.25]]))
    losses = criterion(torch.zeros(1, 1, 3, 2), mask_logits, [{"labels": torch.tensor([0])}], [mask],
                       points=points, target_points=[target])
    torch.testing.assert_close(losses["loss_point"], torch.tensor(0.05 + 0.15))


def test_varifocal_loss_by_hand():
    logits = torch.tensor([[0.3, -1.2]])
    quality = torch.tensor([[0.6, 0.0]])  # a positive of IoU 0.6 and a negative
    p = logits.sigmoid()[0]
    positive = -0.6 * (0.6 * p[0].log() + 0.4 * (1 - p[0]).log())
    negative = -(1 - 0.25) * p[1] ** 2 * (1 - p[1]).log()
    torch.testing.assert_close(varifocal_loss(logits, quality, 0.25, 2.0)[0], torch.stack([positive, negative]))


def test_varifocal_class_target_is_the_matched_masks_iou():
    """The matched query's target for its class is the IoU of its thresholded mask with the ground truth."""
    criterion = SetCriterion(LossConfig(aux_loss=False, class_loss="varifocal"))
    gt = torch.zeros(1, 4, 4)
    gt[0, :2] = 1.0  # top half: 8 pixels
    mask_logits = torch.full((1, 1, 2, 4, 4), -10.0)
    mask_logits[0, 0, 0, :2, :3] = 10.0  # query 0: 6 of the 8 pixels and nothing else -> IoU 0.75
    logits = torch.randn(1, 1, 2, 3)
    losses = criterion(logits, mask_logits, [{"labels": torch.tensor([2])}], [gt])
    quality = torch.zeros(2, 3)
    quality[0, 2] = 0.75
    torch.testing.assert_close(losses["loss_cls"], varifocal_loss(logits[0, 0], quality, 0.25, 2.0).sum())



def test_mask_class_starts_as_the_paper_head_and_classifies_mask_pooled_features():
    """model.mask_class: zero-initialised, so the model first predicts what the same weights predict without it;
    then each query's last-layer logits are the decoder's plus a linear map of the mask features averaged under
    its own predicted mask."""
    pooled, plain = tiny(mask_class=True), tiny()
    plain.load_state_dict({k: v for k, v in pooled.state_dict().items() if "mask_class" not in k})
    images, targets = batch()
    with torch.no_grad():
        for x, y in zip(pooled.eval()(images), plain.eval()(images)):
            for key in x:
                torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)
        torch.nn.init.normal_(pooled.head.mask_class.weight)
        torch.nn.init.normal_(pooled.head.mask_class.bias)
        out = pooled.forward_features(*pooled.batch_images(images))
        b, q = 1, 7
        p = out["mask_logits"][-1, b, q].sigmoid()
        features = (out["mask_features"][b, :64] * p).sum((1, 2)) / p.sum()  # not mask_locality's 4 channels
        expected = pooled.head.class_embed(out["hidden"][-1, b, q]) + pooled.head.mask_class(features)
        torch.testing.assert_close(out["logits"][-1, b, q], expected, rtol=1e-4, atol=1e-4)
        assert out["logits"].shape[0] == pooled.cfg.dec_layers  # the other layers' logits as before
    pooled.train()
    pooled(images, targets)["loss"].backward()
    assert pooled.head.mask_class.weight.grad.abs().sum() > 0


def test_mask_locality_subtracts_a_times_the_squared_distance_to_the_point(tmp_path):
    """model.mask_locality: each mask logit is the paper head's minus a * |(x, y) - p|^2, (x, y) the cell's centre
    and p the query's point in pixels of the image's own area (a padded batch's images differ in size), in
    LOCALITY_UNIT_PX, a = softplus of a per-query linear map; the weights shared with the paper's head predict the
    rest unchanged; it trains; the ONNX graph computes the same."""
    import torch.nn.functional as F

    from isda.models.head import LOCALITY_UNIT_PX

    local, plain = tiny(mask_locality=True), tiny(mask_locality=False)
    plain.load_state_dict({k: v for k, v in local.state_dict().items() if not k.startswith("head.locality")})
    torch.nn.init.normal_(local.head.locality.weight, std=0.1)  # a differs from query to query
    images, targets = batch()  # 96x128 and 128x96: padded to 128x128
    sizes = torch.tensor([[im.shape[2], im.shape[1]] for im in images], dtype=torch.float32)  # (w, h)
    stride = local.cfg.mask_stride

    def compare(atol: float) -> None:
        """local's last-layer mask logits against plain's minus a * d^2 computed here from local's outputs."""
        out = local.forward_features(*local.batch_images(images))
        ref = plain.forward_features(*plain.batch_images(images))
        a = F.softplus(local.head.locality(out["hidden"][-1])).float()[..., 0]  # (B, Q)
        p = out["points"][-1].float() * sizes[:, None]  # (B, Q, 2) in pixels
        h, w = out["padding_mask"].shape[-2:]
        cx, cy = (torch.arange(w) + 0.5) * stride, (torch.arange(h) + 0.5) * stride
        d2 = ((cx.view(1, 1, 1, w) - p[..., 0, None, None]) ** 2
              + (cy.view(1, 1, h, 1) - p[..., 1, None, None]) ** 2) / LOCALITY_UNIT_PX ** 2  # (B, Q, h, w)
        valid = ~out["padding_mask"][:, None].expand_as(d2)
        got, want = out["mask_logits"][-1], ref["mask_logits"][-1].float() - a[..., None, None] * d2
        torch.testing.assert_close(got[valid], want[valid], rtol=0, atol=atol)
        assert bool((got[~valid] < -9000).all())  # padding as before (PADDING_LOGIT)
        torch.testing.assert_close(out["logits"], ref["logits"], rtol=0, atol=0)

    local.eval(), plain.eval()
    with torch.no_grad():
        compare(atol=1e-3)
        # Under bf16 autocast with a sharp locality (terms of hundreds that cancel to a few logits): still -a d^2 to
        # a twentieth of a logit, where bf16 products would miss by about one.
        torch.nn.init.constant_(local.head.locality.bias, 50.0)
        with torch.autocast("cpu", torch.bfloat16):
            compare(atol=0.05)
    local.train()
    local(images, targets)["loss"].backward()
    assert local.head.locality.weight.grad.abs().sum() > 0
    # The exported graph: the same detections as the PyTorch model (the locality is part of the one kernel).
    assert_exported_detections_match(local, images, tmp_path)


def test_mask_mlp_starts_as_the_linear_head_and_adds_a_per_query_two_layer_head(tmp_path):
    """model.mask_mlp_hidden: zero-initialised output weights, so the model first predicts what the same weights
    predict without it; then each mask logit is the linear kernel's plus w2 . relu(W1 f + b1) over every MFR
    channel f (mask_locality's included), with W1, b1, w2 the query's own; it trains; the ONNX graph computes the
    same."""
    mlp, plain = tiny(mask_mlp_hidden=4), tiny()
    plain.load_state_dict({k: v for k, v in mlp.state_dict().items() if not k.startswith("head.mlp_embed")})
    assert_same_predictions(mlp, plain, exact=False)
    torch.nn.init.normal_(mlp.head.mlp_embed.weight, std=0.05)
    images, targets = batch()
    with torch.no_grad():
        out = mlp.eval().forward_features(*mlp.batch_images(images))
        ref = plain.eval().forward_features(*plain.batch_images(images))
        b, q, h = 1, 7, 4
        f = out["mask_features"][b].flatten(1)  # (K, N): the paper's channels and the locality's four
        K = f.shape[0]
        params = mlp.head.mlp_embed(out["hidden"][-1, b, q])
        w1, b1, w2 = params[:h * K].view(h, K), params[h * K:h * K + h], params[h * K + h:]
        extra = w2 @ torch.relu(w1 @ f + b1[:, None])
        valid = ~out["padding_mask"][b].flatten()
        got = out["mask_logits"][-1, b, q].flatten()
        want = ref["mask_logits"][-1, b, q].flatten() + extra
        torch.testing.assert_close(got[valid], want[valid], rtol=1e-4, atol=1e-3)
        assert extra[valid].abs().max() > 0.1  # the head's own part is not negligible here
        torch.testing.assert_close(out["logits"], ref["logits"], rtol=0, atol=0)
    mlp.train()
    mlp(images, targets)["loss"].backward()
    assert mlp.head.mlp_embed.weight.grad[: -h].abs().sum() > 0  # W1 and b1 learn once w2 is not zero
    assert_exported_detections_match(mlp, images, tmp_path)


def assert_exported_detections_match(model: torch.nn.Module, images: list[torch.Tensor], tmp_path) -> None:
    """The model's exported ONNX graph, run by ONNX Runtime, gives the model's detections on each image."""
    from isda.deploy.onnx_export import export_model
    from isda.deploy.runtime import OnnxISDA

    model.eval()
    path = export_model(model, tmp_path / "model.onnx", {"isda.config": "{}"}, size=(70, 90)).path
    runtime = OnnxISDA(path, threads=1)
    with torch.no_grad():
        for image in images:
            (want,), (got,) = model([image]), runtime([image])
            torch.testing.assert_close(got["scores"], want["scores"], atol=1e-4, rtol=0)
            assert torch.equal(got["query_index"][:5], want["query_index"][:5])
