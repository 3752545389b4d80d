"""Dense auxiliary supervision of the encoder (``model.dense_aux``, training only): its one-to-many token
assignment, that its losses train the encoder and learn, and that inference, the ONNX graph and checkpoint
initialisation are those of the model without it."""

import onnx
import pytest
import torch

import isda
from isda.deploy.onnx_export import export_model
from isda.models.dense_aux import assign_tokens, level_sizes
from isda.models.transformer import token_centers
from isda.weights import load_pretrained, save_converted

from engine_utils import generated_images, single_thread
from model_utils import assert_same_predictions, batch, tiny, train_one_step
from test_overfit import mean_best_iou


STEPS = 40  # of the overfit on generated images


def shared_state(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("dense_aux.")}


def test_assignment_numerical_reference():
    """A 64 x 64 batch (token maps 8x8, 4x4, 2x2, 1x1 at strides 8..64): A = rows/cols 0..39 (centroid 20, 20),
    B = rows/cols 16..31 inside it (centroid 24, 24); radius 1.5 strides (12, 24, 48, 96 px). A token centre
    (4 + 8i at stride 8, ...) is a candidate when it lies in the mask and closer than the radius to the centroid
    along both axes; B, the smaller, wins where both qualify."""
    shapes = [(8, 8), (4, 4), (2, 2), (1, 1)]
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, :40, :40] = True
    masks[1, 16:32, 16:32] = True
    centers, sizes = token_centers(shapes, torch.device("cpu")), level_sizes(shapes, torch.device("cpu"))
    padding = torch.zeros(len(centers), dtype=torch.bool)
    got = assign_tokens(centers, sizes, padding, masks, 1.5)

    offsets = [0, 64, 80, 84]
    expected = torch.full((85,), -1)
    a = {0: [(1, 1), (1, 2), (1, 3), (2, 1), (3, 1)], 1: [(0, 0), (0, 1), (1, 0)], 3: [(0, 0)]}
    b = {0: [(2, 2), (2, 3), (3, 2), (3, 3)], 1: [(1, 1)], 2: [(0, 0)]}  # P5's token is in both: B is smaller
    for instance, cells in ((0, a), (1, b)):
        for level, yx in cells.items():
            for y, x in yx:
                expected[offsets[level] + y * shapes[level][1] + x] = instance
    assert torch.equal(got, expected)
    # Padded tokens are never positive; no instance, no positive; a smaller radius keeps the nearest tokens only.
    padding[84] = True
    assert int(assign_tokens(centers, sizes, padding, masks, 1.5)[84]) == -1
    assert bool((assign_tokens(centers, sizes, padding, masks[:0], 1.5) == -1).all())
    # Within half a stride of (20, 20): centre 20 at stride 8, 24 at 16, 16 at 32 (and 32 at 64, padded here).
    near = assign_tokens(centers, sizes, padding, masks[:1], 0.5)
    assert torch.nonzero(near >= 0).flatten().tolist() == [2 * 8 + 2, 64 + 1 * 4 + 1, 80]


def test_assignment_does_not_depend_on_the_batch_padding():
    """The reference's 64 x 64 image alone and padded into a 96 x 128 batch: the same positives at P3..P5 (the
    stride-64 map's tokens move with the padded size) and none in the padding."""
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, :40, :40] = True
    masks[1, 16:32, 16:32] = True
    positives = []
    for shapes, size in (([(8, 8), (4, 4), (2, 2), (1, 1)], (64, 64)), ([(12, 16), (6, 8), (3, 4), (2, 2)], (96, 128))):
        centers, sizes = token_centers(shapes, torch.device("cpu")), level_sizes(shapes, torch.device("cpu"))
        pixels = centers * torch.tensor([size[1], size[0]])
        padding = (pixels >= 64).any(-1)
        padded = torch.nn.functional.pad(masks, (0, size[1] - 64, 0, size[0] - 64))
        got = assign_tokens(centers, sizes, padding, padded, 1.5)
        assert not bool((got[padding] >= 0).any())
        fine = len(centers) - shapes[-1][0] * shapes[-1][1]  # P3..P5
        positives.append({(tuple(pixels[i].round().tolist()), int(got[i])) for i in range(fine) if got[i] >= 0})
    assert positives[0] == positives[1] and len(positives[0]) == 14


def test_losses_are_finite_and_reach_the_encoder():
    model = tiny(dense_aux=True).train()
    losses = model(*batch())
    dense = {k: v for k, v in losses.items() if k.startswith("dense.")}
    assert set(dense) == {"dense.loss_cls", "dense.loss_dice", "dense.loss_bce"}  # isda_tiny has mask BCE
    assert all(torch.isfinite(v) and v > 0 for v in dense.values())
    sum(dense.values()).backward()
    grad = lambda module: sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)
    assert grad(model.transformer.encoder) > 0 and grad(model.mask_features) > 0 and grad(model.backbone) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.dense_aux.parameters())
    assert grad(model.transformer.decoder) == 0 and grad(model.head) == 0  # the decoder's queries are not involved


def test_no_positive_token_still_gives_every_parameter_a_gradient():
    """Images without instances: the losses are finite and every dense-head parameter has a (zero) gradient, as
    DistributedDataParallel requires."""
    model = tiny(dense_aux=True).train()
    images, _ = batch()
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, *im.shape[1:], dtype=torch.bool)}
             for im in images]
    losses = model(images, empty)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["dense.loss_dice"].item() == 0
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.dense_aux.parameters())


def test_dense_aux_learns_on_generated_images():
    """Two generated images, 40 steps with the switch on: the dense head's losses fall and the model's (decoder)
    masks match the instances better."""
    torch.manual_seed(0)
    images, targets = generated_images()
    model = isda.build_model("isda_tiny", num_classes=5, dense_aux=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    with torch.no_grad():
        before = mean_best_iou(model.eval()(images), targets)
    model.train()
    first = None
    for _ in range(STEPS):
        losses = model(images, targets)
        first = first or {k: v.item() for k, v in losses.items() if k.startswith("dense.")}
        optimizer.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
    with torch.no_grad():
        after = mean_best_iou(model.eval()(images), targets)
    last = {k: v.item() for k, v in losses.items() if k.startswith("dense.")}
    print(f"dense aux: {STEPS} steps, {first} -> {last}; mean mask IoU {before:.3f} -> {after:.3f}")
    assert last["dense.loss_cls"] < 0.5 * first["dense.loss_cls"]
    assert last["dense.loss_dice"] < 0.5 * first["dense.loss_dice"]
    assert after > before + 0.3


def trained_pair():
    """A model trained one step with the dense head and the plain model with the same shared weights."""
    trained = train_one_step(tiny(dense_aux=True))
    plain = tiny()
    plain.load_state_dict(shared_state(trained))
    return trained.eval(), plain.eval()


def test_dense_aux_leaves_inference_unchanged():
    assert_same_predictions(*trained_pair())


def canonical(graph: onnx.GraphProto) -> bytes:
    """The graph (nodes, attributes, initializers and their values) with the exporter-numbered names replaced by
    their order of appearance: the exporter's counters also count the module's parameters, so that any extra
    module shifts them."""
    keep = {v.name for v in [*graph.input, *graph.output]}
    names: dict[str, str] = {}
    graph = onnx.GraphProto.FromString(graph.SerializeToString())
    for i, node in enumerate(graph.node):
        node.name = f"n{i}"
        for values in (node.input, node.output):
            for j, v in enumerate(values):
                if v and v not in keep:
                    values[j] = names.setdefault(v, f"v{len(names)}")
    for init in graph.initializer:
        init.name = names[init.name]
    return graph.SerializeToString()


def test_dense_aux_leaves_the_onnx_graph_unchanged(tmp_path):
    """The exported graph (nodes, their attributes, initializers) is that of the plain model up to the exporter's
    numbering of intermediate values: nothing of the dense head is traced or stored."""
    trained, plain = trained_pair()
    graphs = []
    for name, model in (("dense", trained), ("plain", plain)):
        with single_thread():
            export_model(model, tmp_path / f"{name}.onnx", {}, size=(64, 85))
        graphs.append(onnx.load(str(tmp_path / f"{name}.onnx")).graph)
    assert not any("dense_aux" in i.name for i in graphs[0].initializer)
    assert canonical(graphs[0]) == canonical(graphs[1])


def test_plain_checkpoint_initialises_a_dense_aux_model(tmp_path):
    """``--init`` with a checkpoint trained without the switch: everything loads but the dense head, which keeps
    its initialisation; and back, a dense-aux checkpoint into the plain model reports the head unused."""
    torch.manual_seed(8)
    plain = isda.build_model("isda_tiny")
    torch.save({"model": plain.state_dict(), "epoch": 3}, tmp_path / "last.pt")  # the trainer's layout
    dense = isda.build_model("isda_tiny", dense_aux=True)
    init = {k: v.clone() for k, v in dense.state_dict().items()}
    report = load_pretrained(tmp_path / "last.pt", dense)  # strict: only the opt-in modules may be absent
    optional = {k for k in init if k.startswith("dense_aux.")}
    assert optional and set(report.left_at_init) == optional and not report.unused
    assert all("dense auxiliary head" in report.left_at_init[k] for k in optional)
    for k, v in dense.state_dict().items():
        assert torch.equal(v, init[k] if k in optional else plain.state_dict()[k]), k
    # Fine-tuning on other classes: the dense head's class rows follow the class head.
    picked = isda.build_model("isda_tiny", num_classes=2, dense_aux=True)
    report = load_pretrained(save_converted(dense, tmp_path / "dense.pth"), picked, class_indices=[4, 1])
    assert not report.left_at_init
    assert torch.equal(picked.dense_aux.head.class_embed.weight, dense.dense_aux.head.class_embed.weight[[4, 1]])
    back = isda.build_model("isda_tiny")
    report = load_pretrained(tmp_path / "dense.pth", back)
    assert set(report.unused) == optional and not report.left_at_init


@pytest.mark.parametrize("field, value", [("dense_aux_weight", -1), ("dense_aux_max_pos", 0), ("dense_aux_radius", 0)])
def test_bad_fields_fail_with_one_line(field, value):
    cfg = isda.config.get_preset("isda_tiny")
    setattr(cfg.loss, field, value)
    with pytest.raises(isda.config.ConfigError, match=f"loss.{field}"):
        cfg.validate()
