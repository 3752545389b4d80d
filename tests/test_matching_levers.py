"""Matching levers, each opt-in: one-to-many matching of the intermediate decoder layers (``loss.o2m_topk``), the
position-modulated class cost (``loss.match_quality``), look forward twice (``model.look_forward_twice``) and the
mask losses at a finer resolution (``loss.mask_loss_upsample``, tested further in test_mask_loss_upsample.py). The
assignments and costs against hand computations, the gradient paths, that each trains, and that inference and the
ONNX graph do not depend on them."""

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

import isda
from isda.config import ConfigError, LossConfig, apply_overrides, get_preset
from isda.deploy.onnx_export import export_model
from isda.models.losses import SetCriterion, dice_loss
from isda.models.matcher import focal_class_cost, hungarian_match, matching_cost, soft_iou, topk_match

from model_utils import assert_same_predictions, batch, tiny, train_one_step
from engine_utils import generated_images
from test_overfit import mean_best_iou

pytestmark = pytest.mark.usefixtures("one_thread")

LEVERS = [{"loss.o2m_topk": 3}, {"loss.match_quality": 0.5}, {"model.look_forward_twice": True},
          {"loss.mask_loss_upsample": 4}, {"loss.mask_loss_upsample": 4, "loss.mask_loss_points": 256}]
STEPS = 15


@pytest.mark.parametrize("cost, expected", [
    # Query 1 is among the 2 cheapest of both instances: instance 0 (0.2) keeps it over instance 1 (0.3), which
    # is left with one query.
    ([[0.1, 0.5], [0.2, 0.3], [0.9, 0.1], [0.8, 0.7], [0.4, 0.9]], [(0, 0), (1, 0), (2, 1)]),
    # The same conflict, now cheaper for instance 1; instance 0 keeps only query 0.
    ([[0.1, 0.5], [0.35, 0.3], [0.9, 0.1], [0.8, 0.7], [0.4, 0.9]], [(0, 0), (1, 1), (2, 1)]),
])
def test_topk_match_takes_each_instances_cheapest_queries(cost, expected):
    query, target = topk_match(torch.tensor(cost, dtype=torch.float64), 2)
    assert list(zip(query.tolist(), target.tolist())) == expected


def test_topk_match_edge_cases():
    cost = torch.tensor([[0.1, 0.5], [0.6, 0.3], [0.9, 0.8]], dtype=torch.float64)
    # k beyond the query count: every query, each to its cheapest instance.
    assert [q.tolist() for q in topk_match(cost, 10)] == [[0, 1, 2], [0, 1, 1]]
    assert [q.tolist() for q in topk_match(cost, 1)] == [[0, 1], [0, 1]]  # k = 1: each instance's best query
    assert [len(q) for q in topk_match(cost[:, :0], 3)] == [0, 0]  # no instances


def test_intermediate_layers_match_one_to_many_and_the_last_one_to_one():
    """The criterion's losses of each layer against a reference computed from its assignment: the layers before
    the last from topk_match (k positives per instance, normalised by the positives), the last from the Hungarian
    matching (normalised by the instances)."""
    g = torch.Generator().manual_seed(0)
    L, Q, C, k = 3, 8, 3, 3
    logits = torch.randn(L, 2, Q, C, generator=g)
    mask_logits = torch.randn(L, 2, Q, 4, 4, generator=g) * 2
    target_masks = [torch.rand(2, 4, 4, generator=g), torch.rand(1, 4, 4, generator=g)]
    targets = [{"labels": torch.tensor([0, 2])}, {"labels": torch.tensor([1])}]
    cfg = LossConfig(mask_bce_weight=0.0)
    losses = SetCriterion(cfg)(logits, mask_logits, targets, target_masks, topk=k)
    for layer in range(L):
        cls_target, dice, positives = torch.zeros(2, Q, C), 0.0, 0
        for b, (t, tm) in enumerate(zip(targets, target_masks)):
            args = (logits[layer, b], mask_logits[layer, b].flatten(1), t["labels"], tm.flatten(1), cfg)
            query, target = topk_match(matching_cost(*args), k) if layer < L - 1 else hungarian_match(*args)
            assert len(set(query.tolist())) == len(query)  # a query takes at most one instance
            if layer == L - 1:  # one-to-one
                assert len(query) == len(t["labels"])
            cls_target[b, query, t["labels"][target]] = 1.0
            dice += dice_loss(mask_logits[layer, b, query].flatten(1), tm[target].flatten(1)).sum().item()
            positives += len(query)
        norm = positives if layer < L - 1 else 3
        assert layer == L - 1 or positives > 3  # more positives than instances
        prefix = "" if layer == L - 1 else f"d{layer}."
        expected_cls = sigmoid_focal_loss(logits[layer], cls_target, 0.25, 2.0, reduction="sum").item() / norm
        assert losses[prefix + "loss_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
        assert losses[prefix + "loss_dice"].item() == pytest.approx(dice / norm, rel=1e-5)
    # topk = 0 (or fixed matches) is the one-to-one criterion on every layer.
    plain = SetCriterion(cfg)(logits, mask_logits, targets, target_masks)
    assert torch.equal(plain["loss_dice"], losses["loss_dice"]) and plain["d0.loss_dice"] != losses["d0.loss_dice"]


def test_position_modulated_cost_by_hand():
    # Query 0: class score 0.5, mask probabilities (0.75, 0.25) for the target (1, 0): soft IoU 0.75 / 1.25 = 0.6.
    # Query 1: class score 0.9, mask probabilities (0.25, 0.75): soft IoU 0.25 / 1.75 = 1/7.
    logits = torch.tensor([[0.0, -5.0], [math.log(9), -5.0]])
    mask_logits = torch.tensor([[math.log(3), -math.log(3)], [-math.log(3), math.log(3)]])
    labels, target = torch.tensor([0]), torch.tensor([[1.0, 0.0]])
    iou = [0.75 / (1.25 + 1e-6), 0.25 / (1.75 + 1e-6)]
    torch.testing.assert_close(soft_iou(mask_logits, target)[:, 0], torch.tensor(iou))

    def focal(q):  # the official focal cost of score q, alpha 0.25, gamma 2
        return 0.25 * (1 - q) ** 2 * -math.log(q + 1e-12) - 0.75 * q ** 2 * -math.log(1 - q + 1e-12)

    for a in (0.0, 0.5):
        scores = [0.5 ** (1 - a) * iou[0] ** a, 0.9 ** (1 - a) * iou[1] ** a]
        cost = matching_cost(logits, mask_logits, labels, target, LossConfig(match_quality=a))
        expected = [2 * focal(s) + 3 * (1 - i) for s, i in zip(scores, iou)]
        assert cost[:, 0].tolist() == pytest.approx(expected, rel=1e-5)
    # At 0 it is the plain cost, exactly.
    plain = focal_class_cost(logits, labels, 0.25, 2.0)
    assert torch.equal(matching_cost(logits, mask_logits, labels, target, LossConfig()),
                       (2 * plain + 3 * (1 - soft_iou(mask_logits, target))).double())
    torch.testing.assert_close(focal_class_cost(logits, labels, 0.25, 2.0, soft_iou(mask_logits, target), 0.0), plain)
    # The plain cost matches the confident query with the poor mask; modulated, the good mask wins.
    assert hungarian_match(logits, mask_logits, labels, target, LossConfig())[0].tolist() == [1]
    assert hungarian_match(logits, mask_logits, labels, target, LossConfig(match_quality=0.5))[0].tolist() == [0]


@pytest.mark.parametrize("on", [False, True])
def test_look_forward_twice_reaches_the_previous_layer_only(on):
    """A layer's point loss reaches its own point correction and, with the lever only, the previous layer's; never
    the one before (each layer's input point stays detached). The points themselves are the same."""
    model = tiny(look_forward_twice=on).train()
    batch_, mask = model.batch_images(batch()[0])
    for layer in (1, 2):
        model.zero_grad()
        model.forward_features(batch_, mask)["points"][layer].sum().backward()
        grads = [mlp[-1].weight.grad for mlp in model.transformer.point_refine]
        reached = [g is not None and bool(g.abs().sum() > 0) for g in grads]
        assert reached == [i == layer or (on and i == layer - 1) for i in range(3)]
    with torch.no_grad():
        other = tiny(look_forward_twice=not on).train()
        points = [m.forward_features(batch_, mask)["points"] for m in (model, other)]
    assert torch.equal(*points)


def test_bad_values_name_the_field():
    for overrides, field in (({"loss.o2m_topk": -1}, "loss.o2m_topk"),
                             ({"loss.match_quality": 1.0}, "loss.match_quality"),
                             ({"loss.o2m_topk": 2, "loss.aux_loss": False}, "loss.o2m_topk"),
                             ({"model.look_forward_twice": True, "model.refine_points": False},
                              "model.look_forward_twice")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            apply_overrides(get_preset("isda_tiny"), overrides).validate()


@pytest.mark.parametrize("lever", LEVERS, ids=lambda lever: "+".join(lever))
def test_each_lever_trains_on_generated_images(lever):
    torch.manual_seed(0)
    images, targets = generated_images()
    model = isda.build_model("isda_tiny", num_classes=5, **lever)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    model.eval()
    with torch.no_grad():
        before = mean_best_iou(model(images), targets)
    model.train()
    first = None
    for _ in range(STEPS):
        losses = model(images, targets)
        assert all(torch.isfinite(v) for v in losses.values())
        first = first or {k: v.item() for k, v in losses.items()}
        optimizer.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
    for name in ("loss_dice", "d0.loss_dice", "loss_bce"):
        assert losses[name].item() < 0.2 * first[name], name
    model.eval()
    with torch.no_grad():
        after = mean_best_iou(model(images), targets)
    assert after > before + 0.4


@pytest.mark.parametrize("levers", [*LEVERS, {k: v for lever in LEVERS for k, v in lever.items()}],
                         ids=[*("+".join(lever) for lever in LEVERS), "all"])
def test_levers_leave_inference_and_the_onnx_graph_unchanged(levers, tmp_path):
    """Trained one step with the lever on, the weights predict exactly what they predict with it off; with every
    lever on, they also export the same ONNX graph."""
    trained = train_one_step(tiny(**levers))
    plain = tiny()
    plain.load_state_dict(trained.state_dict())
    assert_same_predictions(trained, plain)
    if len(levers) > 1:
        graphs = []
        for name, model in (("on", trained), ("off", plain)):
            export_model(model, tmp_path / f"{name}.onnx", {}, size=(70, 90))
            graphs.append((tmp_path / f"{name}.onnx").read_bytes())
        assert graphs[0] == graphs[1]
