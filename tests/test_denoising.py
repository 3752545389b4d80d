"""Query denoising (``model.denoising_groups``, training only): the queries it builds, what they may see, their
fixed assignment, that they learn, and that inference is the same model without them."""

import pytest
import torch

import isda
from isda.config import ConfigError

from isda.models.denoising import Denoising, self_attention_mask
from isda.models.losses import mask_centroids

from model_utils import assert_same_predictions, batch, tiny, train_one_step


def test_queries_copy_the_instances_within_the_noise():
    images, targets = batch()  # 2 instances and 1
    centroids = [mask_centroids(t["masks"]) for t in targets]
    torch.manual_seed(0)
    dn = Denoising(32, 3, groups=4, label_noise=0.0, point_noise=0.0)
    exact = dn(targets, centroids)
    assert (exact.groups, exact.size) == (4, 2) and exact.reference.shape == (2, 8, 2)
    for b, (t, c) in enumerate(zip(targets, centroids)):
        query, target = exact.matches([2, 1])[b]
        assert sorted(target.tolist()) == list(range(4 * len(t["labels"])))  # every copy of every instance once
        assert bool((query // 2 == target // len(t["labels"])).all())  # copy g sits in group g
        # Without noise: the label's embedding at the centroid.
        torch.testing.assert_close(exact.content[b, query], dn.label_embed(t["labels"].repeat(4)[target]))
        torch.testing.assert_close(exact.reference[b, query], c.repeat(4, 1)[target], atol=1e-5, rtol=0)
    # With noise: every copy within 0.4 x half its box of the centroid, and some labels replaced.
    torch.manual_seed(1)
    noisy = Denoising(32, 3, groups=200, label_noise=0.5, point_noise=0.4)
    out = noisy(targets, centroids)
    query, target = out.matches([2, 1])[0]
    shift = (out.reference[0, query] - centroids[0].repeat(200, 1)[target]).abs()
    half = torch.tensor([[19.5 / 128, 17 / 96], [29.5 / 128, 19.5 / 96]]).repeat(200, 1)[target]  # batch()'s boxes
    assert bool((shift <= 0.4 * half + 1e-5).all()) and bool((shift > 0.2 * half).any())
    same = (out.content[0, query] == noisy.label_embed(targets[0]["labels"].repeat(200)[target])).all(-1).float().mean()
    assert 0.55 < same < 0.8  # 1/2 kept, plus 1/3 of the replaced ones drawn as the same class


def test_a_cap_cuts_the_groups_to_fit_and_keeps_one():
    """model.denoising_max_queries: groups x the batch's most instances per image stay within the cap (at least one
    group), and the fixed assignment follows the groups kept."""
    images, targets = batch()  # at most 2 instances per image: 2 slots per group
    centroids = [mask_centroids(t["masks"]) for t in targets]
    for cap, groups in ((0, 5), (10, 5), (9, 4), (4, 2), (1, 1)):
        torch.manual_seed(3)
        dn = Denoising(32, 3, groups=5, label_noise=0.5, point_noise=0.4, max_queries=cap)(targets, centroids)
        assert (dn.groups, dn.size) == (groups, 2) and dn.reference.shape == (2, groups * 2, 2)
        query, target = dn.matches([2, 1])[1]
        assert sorted(target.tolist()) == list(range(groups))  # the one instance, once per kept group
    # Negative copies count against the cap too: 2 positive + 2 negative slots per group.
    dn = Denoising(32, 3, groups=5, label_noise=0.5, point_noise=0.4, max_queries=9, negatives=True)(targets, centroids)
    assert (dn.groups, dn.size) == (2, 4)
    losses = tiny(denoising_groups=5, denoising_max_queries=2).train()(images, targets)
    assert torch.isfinite(losses["loss"]) and "dn.loss_cls" in losses
    with pytest.raises(ConfigError, match="model.denoising_max_queries"):
        isda.build_model("isda_tiny", denoising_max_queries=-1)


def test_attention_mask_separates_the_query_sets():
    dn = Denoising(32, 3, groups=2, label_noise=0.0, point_noise=0.0)(batch()[1], [torch.rand(2, 2), torch.rand(1, 2)])
    blocked = self_attention_mask(3, 4, dn, torch.device("cpu"))  # 3 one-to-one, 4 one-to-many, 2 groups of 2
    sets = [range(0, 3), range(3, 7), range(7, 9), range(9, 11)]
    for i, rows in enumerate(sets):
        for j, cols in enumerate(sets):
            sees = i == j or (i >= 2 and j == 0)  # each set itself; denoising groups also the one-to-one queries
            assert bool((~blocked[rows.start:rows.stop, cols.start:cols.stop]).all() if sees
                        else blocked[rows.start:rows.stop, cols.start:cols.stop].all()), (i, j)
    assert self_attention_mask(3, 0, None, torch.device("cpu")) is None


def test_learned_queries_and_other_groups_do_not_see_a_group():
    """The one-to-one queries' outputs are the same with and without denoising queries; changing one group's
    queries changes that group's outputs only."""
    model = tiny(denoising_groups=2).train()  # the tiny preset has no dropout: training mode is deterministic
    images, targets = batch()
    batch_, mask = model.batch_images(images)
    dn = model.denoising(targets, [mask_centroids(t["masks"]) for t in targets])
    with torch.no_grad():
        plain = model.forward_features(batch_, mask)
        with_dn = model.forward_features(batch_, mask, dn)
        Q = model.cfg.num_queries
        torch.testing.assert_close(with_dn["hidden"][:, :, :Q], plain["hidden"], rtol=0, atol=1e-5)
        dn.content[:, dn.size:] = torch.randn_like(dn.content[:, dn.size:])  # group 2 changed
        changed = model.forward_features(batch_, mask, dn)["hidden"]
    torch.testing.assert_close(changed[:, :, :Q + dn.size], with_dn["hidden"][:, :, :Q + dn.size], rtol=0, atol=1e-5)
    assert not torch.allclose(changed[:, :, Q + dn.size:], with_dn["hidden"][:, :, Q + dn.size:])


@pytest.mark.parametrize("negatives", [False, True])
def test_denoising_queries_learn_to_reconstruct_their_instances(negatives):
    model = tiny(denoising_groups=2, denoising_negatives=negatives).train()
    images, targets = batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(20):
        losses = model(images, targets)
        first = first or {k: losses[k].item() for k in ("dn.loss_dice", "dn.loss_bce")}
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    # Their masks from a noised label and point (fresh noise every step): as those of the matched queries.
    assert losses["dn.loss_dice"].item() < 0.1 * first["dn.loss_dice"]
    assert losses["dn.loss_bce"].item() < 0.2 * first["dn.loss_bce"]


def test_negative_copies_lie_beyond_the_positive_ones_and_are_background():
    """With negatives each group holds the positive copies, then as many farther ones; only the positives are
    matched (the rest of the slots are trained as background)."""
    images, targets = batch()  # 2 instances and 1
    centroids = [mask_centroids(t["masks"]) for t in targets]
    torch.manual_seed(1)
    out = Denoising(32, 3, groups=100, label_noise=0.0, point_noise=0.2, negatives=True)(targets, centroids)
    assert (out.groups, out.size) == (100, 4) and out.reference.shape == (2, 400, 2)
    query, target = out.matches([2, 1])[0]
    assert bool((query % 4 < 2).all())  # the positive half of each group
    half = torch.tensor([[19.5 / 128, 17 / 96], [29.5 / 128, 19.5 / 96]])  # batch()'s boxes
    positive = (out.reference[0].view(100, 4, 2)[:, :2] - centroids[0]).abs() / half
    negative = (out.reference[0].view(100, 4, 2)[:, 2:] - centroids[0]).abs() / half
    assert bool((positive <= 0.2 + 1e-4).all()) and bool((positive < 0.1).any())
    assert bool((negative >= 0.2 - 1e-4).all() and (negative <= 0.4 + 1e-4).all()) and bool((negative > 0.35).any())
    # Image 1 has one instance: its slots 1 and 3 of each group are padding; slot 2 its negative copy.
    torch.testing.assert_close(out.content[1].view(100, 4, -1)[:, 2], out.content[1].view(100, 4, -1)[:, 0])
    with pytest.raises(ValueError, match="model.denoising_negatives"):
        tiny(denoising_groups=0, denoising_negatives=True)


@pytest.mark.parametrize("levers", [{"denoising_groups": 3, "hybrid_queries": 0},
                                    {"denoising_groups": 3, "hybrid_queries": 40},
                                    {"denoising_groups": 2, "hybrid_queries": 0, "denoising_negatives": True}])
def test_denoising_leaves_inference_unchanged(levers):
    """A model trained with denoising queries predicts exactly what the same weights predict without them."""
    trained = train_one_step(tiny(**levers))
    plain = tiny(hybrid_queries=levers["hybrid_queries"], denoising_groups=0)  # the preset has denoising on
    plain.load_state_dict({k: v for k, v in trained.state_dict().items() if not k.startswith("denoising.")})
    assert_same_predictions(trained, plain)
