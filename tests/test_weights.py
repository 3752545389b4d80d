"""Deformable-DETR weight import (hf / detr / mmdet layouts), ISDA fine-tuning checkpoints, unsafe files.

The Hugging Face tests build transformers' own DeformableDetr with random weights (nothing is downloaded)
and check that, after conversion, ISDA's encoder memory, every decoder layer's hidden states, reference
points and class logits equal transformers' outputs on the same images.
"""

import argparse
import os
import re
from collections import OrderedDict

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from torchvision.models import resnet18

import isda
import isda.models.neck
from isda.config import get_preset
from isda.weights import WeightsError
from isda.models.position_encoding import sine_position_encoding
from isda.weights import (
    COCO_CATEGORY_IDS,
    Layout,
    convert_state_dict,
    detect_format,
    export_state_dict,
    load_pretrained,
    read_checkpoint,
    save_converted,
)

try:
    import transformers
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig
except ImportError:  # pragma: no cover - transformers is in the test extra
    transformers = None

needs_hf = pytest.mark.skipif(transformers is None, reason="transformers is not installed (pip install -e '.[test]')")
TOL = 1e-4

# ISDA tensors that no Deformable-DETR checkpoint provides (R50 paper preset and the tiny preset alike).
ISDA_ONLY = re.compile(r"^(mask_features\.|head\.kernel_embed\.|neck\.lateral\.0\.|neck\.lateral_norm\.0\.|"
                       r"transformer\.point_refine\.|head\.locality\.|denoising\.)")


def isda_only_keys(model):
    return {k for k in model.state_dict() if ISDA_ONLY.match(k)}


def assert_one_line_error(excinfo, *fragments):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


# ------------------------------------------------------------------------------------------------
# Hugging Face transformers: numerical parity


def hf_config(paper: bool, num_labels: int):
    if paper:  # ResNet-50 (transformers' own ResNet, no timm), 4 levels, 6+6 layers, 300 queries, d 256, FFN 1024
        backbone = ResNetConfig(out_features=["stage2", "stage3", "stage4"])
        sizes = dict(num_queries=300, d_model=256, encoder_layers=6, decoder_layers=6, encoder_ffn_dim=1024,
                     decoder_ffn_dim=1024)
    else:  # the isda_tiny preset's sizes
        backbone = ResNetConfig(layer_type="basic", hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                out_features=["stage2", "stage3", "stage4"])
        sizes = dict(num_queries=get_preset("isda_tiny").model.num_queries, d_model=128, encoder_layers=2,
                     decoder_layers=3, encoder_ffn_dim=512, decoder_ffn_dim=512)
    cfg = DeformableDetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, num_labels=num_labels,
        encoder_attention_heads=8, decoder_attention_heads=8, num_feature_levels=4, encoder_n_points=4,
        decoder_n_points=4, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, with_box_refine=False,
        two_stage=False, position_embedding_type="sine", **sizes)
    cfg._attn_implementation = "eager"
    return cfg


def random_hf(paper: bool, num_labels: int, seed: int = 0):
    """transformers' DeformableDetrForObjectDetection with every tensor randomized (incl. the sampling
    offset / attention weight projections, which its init sets to zero, and the frozen BN statistics)."""
    torch.manual_seed(seed)
    model = DeformableDetrForObjectDetection(hf_config(paper, num_labels)).eval()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith("running_var"):
                value.uniform_(0.5, 2.0)
            elif key.endswith("running_mean"):
                value.normal_(0.0, 0.1)
            elif value.is_floating_point():
                value.add_(torch.randn_like(value) * 0.02)
    return model


@pytest.fixture(scope="module")
def hf_paper():
    if transformers is None:
        pytest.skip("transformers is not installed")
    hf = random_hf(paper=True, num_labels=91)  # COCO class head indexed by category id, as the real checkpoints
    torch.manual_seed(1)
    model = isda.build_model("isda_r50_coco").eval()
    report = convert_state_dict(hf.state_dict(), None, model, class_indices=COCO_CATEGORY_IDS)
    return hf, model, report


def run_both(hf, model, images):
    """Same normalized pixels and padding mask into both; ISDA through its own submodules."""
    batch, mask = model.batch_images(images)
    with torch.no_grad():
        theirs = hf(pixel_values=batch, pixel_mask=(~mask).long())
        feats, masks = model.neck(model.backbone(batch), mask)
        pos = [sine_position_encoding(m, model.cfg.hidden_dim // 2) for m in masks[1:]]
        ours = model.transformer(feats[1:], masks[1:], pos)
        ours["logits"] = model.head.class_embed(ours["hidden"])
    return ours, theirs


def max_errors(ours, theirs, b, class_rows=None):
    logits = theirs.logits[b] if class_rows is None else theirs.logits[b][..., list(class_rows)]
    return {
        "encoder memory": (ours["memory"][b] - theirs.encoder_last_hidden_state[b]).abs().max().item(),
        "decoder hidden (all layers)": (ours["hidden"][:, b] - theirs.intermediate_hidden_states[b]).abs().max().item(),
        "reference points": max((ours["reference_points"][b] - theirs.init_reference_points[b]).abs().max().item(),
                                (ours["reference_points"][b][None] - theirs.intermediate_reference_points[b]).abs().max().item()),
        "class logits (last layer)": (ours["logits"][-1, b] - logits).abs().max().item(),
    }


@needs_hf
def test_hf_parity_paper_sizes(hf_paper):
    hf, model, _ = hf_paper
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 128, 160, generator=g), torch.rand(3, 128, 160, generator=g)]  # no padding
    ours, theirs = run_both(hf, model, images)
    assert ours["hidden"].shape == (6, 2, 300, 256) and theirs.intermediate_hidden_states.shape == (2, 6, 300, 256)
    for b in range(2):
        errors = max_errors(ours, theirs, b, COCO_CATEGORY_IDS)
        print(f"HF parity, R50 paper sizes, image {b} (128x160, no padding): "
              + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
        assert all(v <= TOL for v in errors.values()), errors
    assert float(ours["memory"].abs().max()) > 0.5  # not a trivially small comparison


@pytest.fixture(scope="module")
def hf_tiny():
    if transformers is None:
        pytest.skip("transformers is not installed")
    hf = random_hf(paper=False, num_labels=5, seed=3)
    torch.manual_seed(1)
    model = isda.build_model("isda_tiny").eval()  # ResNet-18 with (eval-mode) BatchNorm2d, d 128, 2+3 layers
    report = convert_state_dict(hf.state_dict(), None, model)
    return hf, model, report


@needs_hf
def test_hf_parity_with_padding(hf_tiny, monkeypatch):
    """isda_tiny sizes; batch of 128x160 + 96x128 (padded). The unpadded image matches exactly. The padded
    one does not: ISDA's neck is padding-aware (GroupNorm statistics over valid pixels, P6 from the zeroed
    C5), HF's is not. With a plain neck patched in, the padded image matches too: that is the only difference."""
    hf, model, report = hf_tiny
    assert "head.class_embed.weight" in report.loaded  # 5 = 5 classes: the class head loads as is
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 128, 160, generator=g), torch.rand(3, 96, 128, generator=g)]
    ours, theirs = run_both(hf, model, images)
    errors0, errors1 = max_errors(ours, theirs, 0), max_errors(ours, theirs, 1)
    print("HF parity, tiny sizes, padded batch, unpadded image: " + ", ".join(f"{k} {v:.2e}" for k, v in errors0.items()))
    print("HF vs ISDA, padded image (padding-aware neck): " + ", ".join(f"{k} {v:.2e}" for k, v in errors1.items()))
    assert all(v <= TOL for v in errors0.values()), errors0
    assert errors1["encoder memory"] > 1e-2  # expected: the neck's padding handling differs

    monkeypatch.setattr(isda.models.neck, "masked_group_norm", lambda x, mask, gn: gn(x))
    monkeypatch.setattr(isda.models.neck, "valid_of", lambda mask: torch.ones(mask.shape[0], 1, *mask.shape[1:]))
    ours, theirs = run_both(hf, model, images)
    errors1 = max_errors(ours, theirs, 1)
    print("HF parity, padded image, plain-GroupNorm neck: " + ", ".join(f"{k} {v:.2e}" for k, v in errors1.items()))
    assert all(v <= TOL for v in errors1.values()), errors1


@needs_hf
def test_hf_report_and_layout_match_transformers(hf_paper):
    hf, model, report = hf_paper
    src = hf.state_dict()
    assert report.fmt == "hf" and report.layout == Layout(hf_prefix="model.")
    bbox = {k for k in src if k.startswith("bbox_embed.")}
    copies = {f"class_embed.{j}.{p}" for j in range(1, 6) for p in ("weight", "bias")}
    assert len(bbox) == 36
    assert set(report.unused) == bbox | copies
    assert set(report.left_at_init) == isda_only_keys(model)
    assert len(report.loaded) + len(report.left_at_init) == len(model.state_dict())
    # A few names written out by hand: the transformers 5 layout, and the tensors they feed.
    own = model.state_dict()
    for theirs, ours in [
        ("model.backbone.model.embedder.embedder.convolution.weight", "backbone.stem.0.weight"),
        ("model.backbone.model.encoder.stages.0.layers.0.shortcut.normalization.running_var",
         "backbone.layer1.0.downsample.1.running_var"),
        ("model.backbone.model.encoder.stages.3.layers.2.layer.2.convolution.weight", "backbone.layer4.2.conv3.weight"),
        ("model.input_proj.0.0.weight", "neck.lateral.1.weight"),
        ("model.input_proj.3.1.bias", "neck.extra_norm.bias"),
        ("model.level_embed", "transformer.level_embed"),
        ("model.encoder.layers.5.self_attn.sampling_offsets.weight", "transformer.encoder.5.self_attn.sampling_offsets.weight"),
        ("model.encoder.layers.0.self_attn_layer_norm.weight", "transformer.encoder.0.norm.weight"),
        ("model.encoder.layers.0.mlp.fc2.weight", "transformer.encoder.0.ffn.linear2.weight"),
        ("model.decoder.layers.0.self_attn.o_proj.bias", "transformer.decoder.0.self_attn.out_proj.bias"),
        ("model.decoder.layers.3.encoder_attn.attention_weights.weight", "transformer.decoder.3.cross_attn.attention_weights.weight"),
        ("model.decoder.layers.0.self_attn_layer_norm.bias", "transformer.decoder.0.norm1.bias"),
        ("model.decoder.layers.0.encoder_attn_layer_norm.bias", "transformer.decoder.0.norm2.bias"),
        ("model.decoder.layers.5.final_layer_norm.weight", "transformer.decoder.5.ffn.norm.weight"),
        ("model.query_position_embeddings.weight", "transformer.query_embed.weight"),
        ("model.reference_points.weight", "transformer.reference_points.weight"),
    ]:
        assert torch.equal(src[theirs], own[ours]), (theirs, ours)
    q, k, v = (src[f"model.decoder.layers.2.self_attn.{x}_proj.weight"] for x in "qkv")
    assert torch.equal(own["transformer.decoder.2.self_attn.in_proj_weight"], torch.cat([q, k, v]))
    assert torch.equal(own["head.class_embed.weight"], src["class_embed.0.weight"][list(COCO_CATEGORY_IDS)])
    # Export reproduces transformers' own key sets and tensors (class head aside: 80 of 91 rows taken).
    exported = export_state_dict(model, "hf", report.layout)
    assert set(exported) == set(src) - bbox
    assert all(torch.equal(exported[k], src[k]) for k in exported if not k.startswith("class_embed."))
    assert set(export_state_dict(model, "hf")) == set(hf.model.state_dict())  # DeformableDetrModel layout
    text = str(report)
    assert "left at initialisation: 34 tensors" in text and "box regression head" in text


def to_hub_layout(state):
    """transformers 5 names -> transformers 4.x names with a timm ResNet (the layout of hub checkpoints such
    as SenseTime/deformable-detr), written independently of isda.weights."""
    out = OrderedDict()
    for key, value in state.items():
        key = key.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
        key = re.sub(r"\.mlp\.fc([12])\.", r".fc\1.", key)
        key = key.replace(".self_attn.o_proj.", ".self_attn.out_proj.")
        key = key.replace("embedder.embedder.convolution.", "conv1.").replace("embedder.embedder.normalization.", "bn1.")
        m = re.search(r"encoder\.stages\.(\d)\.layers\.(\d+)\.(layer\.(\d)|shortcut)\.(convolution|normalization)\.", key)
        if m and "backbone" in key:
            stage, block, _, j, kind = m.groups()
            if j is None:
                new = f"layer{int(stage) + 1}.{block}.downsample.{0 if kind == 'convolution' else 1}."
            else:
                new = f"layer{int(stage) + 1}.{block}.{'conv' if kind == 'convolution' else 'bn'}{int(j) + 1}."
            key = key[: m.start()] + new + key[m.end():]
        out[key] = value
    return out


@needs_hf
def test_hf_hub_layout_from_safetensors_and_class_mismatch(tmp_path):
    hf = random_hf(paper=False, num_labels=91, seed=4)
    new = hf.state_dict()
    hub = to_hub_layout(new)
    for key in ["model.backbone.conv_encoder.model.conv1.weight", "model.backbone.conv_encoder.model.layer1.0.bn2.running_mean",
                "model.backbone.conv_encoder.model.layer2.0.downsample.0.weight", "model.encoder.layers.0.fc1.weight",
                "model.decoder.layers.0.self_attn.out_proj.weight", "model.decoder.layers.0.self_attn.q_proj.bias",
                "model.decoder.layers.2.encoder_attn.sampling_offsets.bias", "model.query_position_embeddings.weight",
                "class_embed.0.weight", "bbox_embed.0.layers.2.weight"]:
        assert key in hub, key
    from safetensors.torch import save_file

    # save_pretrained stores tied tensors once: of the per-layer heads only class_embed.0 / bbox_embed.0.
    hub = OrderedDict((k, v) for k, v in hub.items() if not re.match(r"(class|bbox)_embed\.[1-9]", k))
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hub.items()}, str(path))
    # 5 classes: the 91-way head does not fit and stays at init. With 200 training-only hybrid queries after the
    # preset's one-to-one queries: those keep each model's own initialisation.
    a = isda.build_model("isda_tiny", hybrid_queries=200)
    b = isda.build_model("isda_tiny", hybrid_queries=200)
    queries = a.cfg.num_queries
    head_before = a.head.class_embed.weight.clone()
    rep_a = load_pretrained(path, a)
    rep_b = convert_state_dict(new, "hf", b)
    assert rep_a.layout == Layout(hf_prefix="model.", hf_timm_backbone=True, hf_legacy_names=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k][:queries] if "query_embed" in k else sa[k], sb[k][:queries] if "query_embed" in k
                           else sb[k]) for k in rep_b.loaded)
    assert torch.equal(a.head.class_embed.weight, head_before)
    assert any("200 one-to-many (hybrid) queries keep their initialisation" in n for n in rep_a.notes)
    assert set(rep_a.left_at_init) == isda_only_keys(a) | {"head.class_embed.weight", "head.class_embed.bias"}
    assert "class count differs: checkpoint 91, model 5" in rep_a.left_at_init["head.class_embed.weight"]
    assert set(rep_a.unused) == {k for k in hub if k.startswith(("bbox_embed.", "class_embed."))}
    exported = export_state_dict(a, "hf", rep_a.layout, include_class_head=False)
    assert set(exported) == {k for k in hub if not k.startswith(("bbox_embed.", "class_embed."))}
    assert all(torch.equal(exported[k], hub[k]) for k in exported)
    assert str(path) in str(rep_a)


# ------------------------------------------------------------------------------------------------
# fundamentalvision/Deformable-DETR and mmdetection layouts (paper sizes)


@pytest.fixture(scope="module")
def source_r50():
    """A random R50 ISDA with every tensor perturbed (so nothing equals a fresh model's init)."""
    torch.manual_seed(5)
    model = isda.build_model("isda_r50_coco")
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.randn_like(value) * 0.02)
    return model


def shapes_of(state, expected):
    for key, shape in expected.items():
        assert key in state, f"{key} missing from the layout"
        assert tuple(state[key].shape) == shape, (key, tuple(state[key].shape), shape)


def assert_shared_parts_equal(src_model, dst_model, report):
    src, dst = src_model.state_dict(), dst_model.state_dict()
    for key in report.loaded:
        if not key.startswith("head.class_embed."):
            assert torch.equal(src[key], dst[key]), key


def test_detr_layout_round_trip(tmp_path, source_r50):
    state = export_state_dict(source_r50, "detr")
    shapes_of(state, {
        "backbone.0.body.conv1.weight": (64, 3, 7, 7),
        "backbone.0.body.bn1.running_var": (64,),
        "backbone.0.body.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "backbone.0.body.layer4.2.conv3.weight": (2048, 512, 1, 1),
        "input_proj.0.0.weight": (256, 512, 1, 1),
        "input_proj.2.1.weight": (256,),
        "input_proj.3.0.weight": (256, 2048, 3, 3),
        "transformer.level_embed": (4, 256),
        "transformer.encoder.layers.5.self_attn.sampling_offsets.weight": (256, 256),
        "transformer.encoder.layers.0.self_attn.attention_weights.bias": (128,),
        "transformer.encoder.layers.0.linear1.weight": (1024, 256),
        "transformer.encoder.layers.3.norm2.bias": (256,),
        "transformer.decoder.layers.0.self_attn.in_proj_weight": (768, 256),
        "transformer.decoder.layers.0.self_attn.out_proj.weight": (256, 256),
        "transformer.decoder.layers.5.cross_attn.value_proj.weight": (256, 256),
        "transformer.decoder.layers.1.norm3.weight": (256,),
        "transformer.reference_points.weight": (2, 256),
        "query_embed.weight": (300, 512),
        "class_embed.5.weight": (80, 256),
    })
    assert not any(k.startswith(("neck.", "mask_features.", "head.")) for k in state)
    # What the released checkpoint carries besides: a 91-way COCO class head (shared by the 6 layers),
    # the box head, and the training options.
    head_w, head_b = torch.randn(91, 256), torch.randn(91)
    for j in range(6):
        state[f"class_embed.{j}.weight"], state[f"class_embed.{j}.bias"] = head_w, head_b
        for i, (o, n) in enumerate([(256, 256), (256, 256), (4, 256)]):
            state[f"bbox_embed.{j}.layers.{i}.weight"], state[f"bbox_embed.{j}.layers.{i}.bias"] = torch.randn(o, n), torch.randn(o)
    path = tmp_path / "r50_deformable_detr-checkpoint.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=2e-4, num_queries=300, with_box_refine=False),
                "epoch": 49}, path)

    model = isda.build_model("isda_r50_coco")
    report = load_pretrained(path, model)
    assert report.fmt == "detr"
    assert_shared_parts_equal(source_r50, model, report)
    own = model.state_dict()
    # Deformable-DETR's decoder: norm2 follows the self-attention (our norm1), norm1 the cross-attention.
    assert torch.equal(own["transformer.decoder.4.norm1.weight"], state["transformer.decoder.layers.4.norm2.weight"])
    assert torch.equal(own["transformer.decoder.4.norm2.weight"], state["transformer.decoder.layers.4.norm1.weight"])
    assert torch.equal(own["neck.extra.weight"], state["input_proj.3.0.weight"])
    assert torch.equal(own["neck.lateral.3.weight"], state["input_proj.2.0.weight"])
    assert set(report.left_at_init) == isda_only_keys(model) | {"head.class_embed.weight", "head.class_embed.bias"}
    assert set(report.unused) == {k for k in state if k.startswith(("class_embed.", "bbox_embed."))}
    assert report.unused["bbox_embed.0.layers.0.weight"].startswith("box regression head")
    exported = export_state_dict(model, "detr", include_class_head=False)
    assert set(exported) == {k for k in state if not k.startswith(("class_embed.", "bbox_embed."))}
    assert all(torch.equal(exported[k], state[k]) for k in exported)

    # The 91-way head indexed by COCO category id -> our 80 labels.
    again = convert_state_dict(state, "detr", model, class_indices=COCO_CATEGORY_IDS)
    assert "head.class_embed.weight" in again.loaded
    assert set(again.unused) == {k for k in state if k.startswith("bbox_embed.") or re.match(r"class_embed\.[1-5]\.", k)}


def test_mmdet_layout_round_trip(tmp_path, source_r50):
    with pytest.warns(UserWarning, match="no such bias"):  # the perturbed source has nonzero neck biases
        state = export_state_dict(source_r50, "mmdet")
    shapes_of(state, {
        "backbone.conv1.weight": (64, 3, 7, 7),
        "backbone.bn1.bias": (64,),
        "backbone.layer2.0.downsample.1.running_mean": (512,),
        "backbone.layer3.5.conv2.weight": (256, 256, 3, 3),
        "neck.convs.0.conv.weight": (256, 512, 1, 1),
        "neck.convs.2.gn.weight": (256,),
        "neck.extra_convs.0.conv.weight": (256, 2048, 3, 3),
        "neck.extra_convs.0.gn.bias": (256,),
        "bbox_head.transformer.level_embeds": (4, 256),
        "bbox_head.transformer.encoder.layers.0.attentions.0.sampling_offsets.weight": (256, 256),
        "bbox_head.transformer.encoder.layers.0.ffns.0.layers.0.0.weight": (1024, 256),
        "bbox_head.transformer.encoder.layers.5.ffns.0.layers.1.weight": (256, 1024),
        "bbox_head.transformer.encoder.layers.2.norms.1.bias": (256,),
        "bbox_head.transformer.decoder.layers.0.attentions.0.attn.in_proj_weight": (768, 256),
        "bbox_head.transformer.decoder.layers.0.attentions.0.attn.out_proj.bias": (256,),
        "bbox_head.transformer.decoder.layers.5.attentions.1.output_proj.weight": (256, 256),
        "bbox_head.transformer.decoder.layers.0.norms.2.weight": (256,),
        "bbox_head.transformer.reference_points.weight": (2, 256),
        "bbox_head.query_embedding.weight": (300, 512),
        "bbox_head.cls_branches.5.weight": (80, 256),
    })
    assert "neck.convs.0.conv.bias" not in state  # ConvModule before GN: no bias
    # Extras of a real mmdetection checkpoint: BN step counters (plain BatchNorm2d) and the box branches.
    for key in [k for k in state if k.startswith("backbone.") and k.endswith("running_mean")]:
        state[key.replace("running_mean", "num_batches_tracked")] = torch.tensor(1000)
    for j in range(6):
        for i, o in ((0, 256), (2, 256), (4, 4)):
            state[f"bbox_head.reg_branches.{j}.{i}.weight"], state[f"bbox_head.reg_branches.{j}.{i}.bias"] = torch.randn(o, 256), torch.randn(o)
    path = tmp_path / "deformable_detr_r50_16x2_50e_coco.pth"
    torch.save({"meta": {"mmdet_version": "2.25.0", "CLASSES": ("person", "bicycle"), "epoch": 50},
                "state_dict": OrderedDict(state)}, path)

    model = isda.build_model("isda_r50_coco")
    report = load_pretrained(path, model)
    assert report.fmt == "mmdet" and report.layout == Layout(mmdet_neck_bias=False)
    own = model.state_dict()
    for key in report.loaded:
        if key.startswith("neck.") and key.endswith(".bias") and "norm" not in key:
            assert not own[key].any(), key  # bias-free convs
        else:
            assert torch.equal(own[key], source_r50.state_dict()[key]), key
    assert torch.equal(own["transformer.decoder.1.norm1.bias"], state["bbox_head.transformer.decoder.layers.1.norms.0.bias"])
    assert torch.equal(own["transformer.decoder.1.norm2.bias"], state["bbox_head.transformer.decoder.layers.1.norms.1.bias"])
    assert torch.equal(own["head.class_embed.weight"], state["bbox_head.cls_branches.0.weight"])  # 80 = 80: loads
    assert set(report.left_at_init) == isda_only_keys(model)
    counters = {k for k in state if k.endswith("num_batches_tracked")}
    assert len(counters) == 53
    assert set(report.unused) == (counters | {k for k in state if k.startswith("bbox_head.reg_branches.")}
                                  | {f"bbox_head.cls_branches.{j}.{p}" for j in range(1, 6) for p in ("weight", "bias")})
    exported = export_state_dict(model, "mmdet")
    assert set(exported) == set(state) - {k for k in report.unused if not k.startswith("bbox_head.cls_branches.")}
    assert all(torch.equal(exported[k], state[k]) for k in exported)
    assert "neck conv biases set to zero" in str(report)


# ------------------------------------------------------------------------------------------------
# ISDA checkpoints: fine-tuning with another number of classes


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_isda_checkpoint_other_class_count(tmp_path, suffix):
    torch.manual_seed(6)
    src = isda.build_model("isda_tiny")  # 5 classes
    path = save_converted(src, tmp_path / f"isda_tiny{suffix}")
    dst = isda.build_model("isda_tiny", num_classes=3)
    report = load_pretrained(path, dst)
    assert report.fmt == "isda"
    # The preset trains with query denoising: its label embedding has one row per class, like the class head.
    rows = {"head.class_embed.weight", "head.class_embed.bias", "denoising.label_embed.weight"}
    assert set(report.left_at_init) == set(report.unused) == rows
    s, d = src.state_dict(), dst.state_dict()
    assert all(torch.equal(s[k], d[k]) for k in d if k not in rows)
    # The trainer's layout ({"model": state_dict, ...}) and picking classes explicitly.
    torch.save({"model": src.state_dict(), "optimizer": {"lr": 1e-4}, "epoch": 3}, tmp_path / "last.pth")
    picked = isda.build_model("isda_tiny", num_classes=2)
    rep = load_pretrained(tmp_path / "last.pth", picked, class_indices=[4, 1])
    assert not rep.left_at_init and torch.equal(picked.head.class_embed.weight, s["head.class_embed.weight"][[4, 1]])


def test_isda_checkpoint_with_and_without_the_opt_in_modules(tmp_path):
    """Query denoising (training only) and the mask-pooled classifier (zero at start) are optional in a
    checkpoint: a plain checkpoint initialises a model that has them, and their class rows follow the class
    head when fine-tuning on other classes."""
    torch.manual_seed(8)
    plain = isda.build_model("isda_tiny", denoising_groups=0)
    path = save_converted(plain, tmp_path / "plain.pth")
    extended = isda.build_model("isda_tiny", denoising_groups=2, mask_class=True)
    init = {k: v.clone() for k, v in extended.state_dict().items()}
    report = load_pretrained(path, extended)  # strict: only the opt-in modules may be absent
    optional = {k for k in init if k.startswith(("denoising.", "head.mask_class."))}
    assert len(optional) == 7 and set(report.left_at_init) == optional and not report.unused
    for k, v in extended.state_dict().items():
        assert torch.equal(v, init[k] if k in optional else plain.state_dict()[k]), k
    missing_core = {k: v for k, v in plain.state_dict().items() if k != "head.class_embed.bias"}
    with pytest.raises(WeightsError, match="lacks 1 of this model's tensors, e.g. 'head.class_embed.bias'"):
        load_pretrained(save_converted_state(missing_core, tmp_path / "core.pth"), extended)

    torch.manual_seed(9)
    src = isda.build_model("isda_tiny", denoising_groups=2, mask_class=True)  # 5 classes
    s = src.state_dict()
    path = save_converted(src, tmp_path / "extended.pth")
    rows = {"head.class_embed.weight", "head.class_embed.bias", "head.mask_class.weight", "head.mask_class.bias",
            "denoising.label_embed.weight"}
    other = isda.build_model("isda_tiny", num_classes=3, denoising_groups=2, mask_class=True)
    report = load_pretrained(path, other)
    assert set(report.left_at_init) == set(report.unused) == rows
    assert torch.equal(other.state_dict()["denoising.pos_mlp.0.weight"], s["denoising.pos_mlp.0.weight"])
    picked = isda.build_model("isda_tiny", num_classes=2, denoising_groups=2, mask_class=True)
    report = load_pretrained(path, picked, class_indices=[4, 1])
    assert not report.left_at_init
    for k in rows:
        assert torch.equal(picked.state_dict()[k], s[k][[4, 1]]), k
    # Into the plain model: the opt-in tensors are reported unused, everything else loads.
    back = isda.build_model("isda_tiny", denoising_groups=0)
    report = load_pretrained(path, back)
    assert set(report.unused) == {k for k in s if k.startswith(("denoising.", "head.mask_class."))}
    assert not report.left_at_init


def save_converted_state(state: dict[str, torch.Tensor], path) -> str:
    torch.save({"model": state}, path)
    return str(path)


def test_converted_file_reloads(tmp_path):
    """convert (detr) -> save_converted -> load_pretrained: the CLI's `convert` then `train --init`."""
    torch.manual_seed(7)
    src = isda.build_model("isda_tiny")
    converted = isda.build_model("isda_tiny")
    report = convert_state_dict({"model": export_state_dict(src, "detr")}, "detr", converted)
    path = save_converted(converted, tmp_path / "out" / "isda_init.pth", report)
    meta = torch.load(path, weights_only=True)["meta"]
    assert meta["source_format"] == "detr" and meta["left_at_init"] == sorted(report.left_at_init)
    final = isda.build_model("isda_tiny")
    rep = load_pretrained(path, final)
    assert not rep.left_at_init and not rep.unused
    assert all(torch.equal(v, converted.state_dict()[k]) for k, v in final.state_dict().items())


def test_strict_and_partial(tmp_path):
    torch.manual_seed(8)
    src = isda.build_model("isda_tiny")
    state = export_state_dict(src, "detr")
    del state["transformer.decoder.layers.2.linear1.weight"]
    with pytest.raises(WeightsError) as e:
        convert_state_dict(state, None, isda.build_model("isda_tiny"))
    assert_one_line_error(e, "incomplete", "transformer.decoder.layers.2.linear1.weight", "strict=False")
    report = convert_state_dict(state, None, isda.build_model("isda_tiny"), strict=False)
    assert "transformer.decoder.2.ffn.linear1.weight" in report.left_at_init
    # A model with fewer decoder layers than the checkpoint: refused unless strict=False.
    with pytest.raises(WeightsError) as e:
        convert_state_dict(state, None, isda.build_model("isda_tiny", dec_layers=2))
    assert_one_line_error(e, "3 decoder layers, the model 2")
    report = convert_state_dict(state, None, isda.build_model("isda_tiny", dec_layers=2), strict=False)
    assert "transformer.decoder.layers.2.linear2.weight" in report.unused


# ------------------------------------------------------------------------------------------------
# Detection and bad files


def test_format_detection():
    torch.manual_seed(9)
    model = isda.build_model("isda_tiny")
    for fmt in ("detr", "mmdet", "isda"):
        assert detect_format(export_state_dict(model, fmt)) == fmt
    assert detect_format(export_state_dict(model, "hf")) == "hf"
    assert detect_format(export_state_dict(model, "hf", Layout(hf_prefix="model.", hf_timm_backbone=True,
                                                                hf_legacy_names=True))) == "hf"


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    torch.manual_seed(10)
    path = tmp_path / "detr.pth"
    torch.save({"model": export_state_dict(isda.build_model("isda_tiny"), "detr")}, path)
    with pytest.raises(WeightsError) as e:
        load_pretrained(path, isda.build_model("isda_tiny", num_queries=20, hybrid_queries=0))
    queries = get_preset("isda_tiny").model.num_queries
    assert_one_line_error(e, str(path), "query_embed.weight", f"({queries}, 256)", "(20, 256)")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def bad_dir(module_dir):
    d = module_dir
    torch.manual_seed(11)
    tiny = isda.build_model("isda_tiny")
    good = d / "good.pth"
    torch.save({"model": export_state_dict(tiny, "detr")}, good)
    data = good.read_bytes()
    (d / "truncated.pth").write_bytes(data[: len(data) // 2])
    torch.save(resnet18().state_dict(), d / "resnet18.pth")
    torch.save({"epoch": 3, "lr": 0.1}, d / "random_dict.pth")
    torch.save({"foo.weight": torch.zeros(3)}, d / "random_tensors.pth")
    torch.save({"state_dict": export_state_dict(tiny, "mmdet")}, d / "mmdet.pth")
    torch.save({"model": {"a": torch.zeros(1)}, "payload": _RunsCode(d / "PWNED")}, d / "code.pth")
    (d / "text.pth").write_text("hello, not weights\n")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(100)}, str(d / "x.safetensors"))
    st = (d / "x.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(st[: len(st) - 50])
    return d


@pytest.mark.parametrize("name,fmt,fragments", [
    ("missing.pth", None, ["weights file not found"]),
    ("truncated.pth", None, ["not a loadable torch weights file"]),
    ("text.pth", None, ["not a loadable torch weights file"]),
    ("truncated.safetensors", None, ["not a readable safetensors file"]),
    ("resnet18.pth", None, ["ResNet classifier"]),
    ("random_dict.pth", None, ["no state dict of tensors", "'epoch'"]),
    ("random_tensors.pth", None, ["not a Deformable-DETR", "foo.weight"]),
    ("mmdet.pth", "detr", ["not a fundamentalvision Deformable-DETR checkpoint", "'mmdet' format"]),
    ("mmdet.pth", "yolo", ["unknown weights format 'yolo'"]),
    ("code.pth", None, ["refused to unpickle", "system"]),
])
def test_bad_files_fail_with_one_line(bad_dir, name, fmt, fragments):
    path = bad_dir / name
    with pytest.raises(WeightsError) as e:
        load_pretrained(path, isda.build_model("isda_tiny"), fmt=fmt)
    assert_one_line_error(e, *fragments)
    if fmt != "yolo":
        assert str(path) in str(e.value)
    assert not (bad_dir / "PWNED").exists()


def test_read_checkpoint_unwraps_containers(tmp_path):
    torch.save({"module.a": torch.ones(1)}, tmp_path / "ddp.pth")
    assert set(read_checkpoint(tmp_path / "ddp.pth")) == {"a"}
