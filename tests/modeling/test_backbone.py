import json

import pytest
import torch

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes

from regionclip_d2 import get_regionclip_cfg
from regionclip_d2.modeling.backbone import (
    CLIPResNet,
    attention_pool,
    build_clip_resnet_backbone,
    build_clip_resnet_fpn_backbone,
    interpolate_positional_embedding,
)
from regionclip_d2.modeling.clip_model import (
    UnknownCLIPModelError,
    build_visual_tower,
    get_clip_model_config,
    resnet_model_names,
)

# The tolerance of the exactness requirement (README: "Exactness"). Not zero because the
# region path and open_clip compute the same sums in a different order (FrozenBN's
# eval batch_norm vs BatchNorm2d, one attention query vs all of them).
EXACT_ATOL = 1e-5


def test_full_image_region_equals_encode_image(tiny_clip):
    """Region embedding of the full-image box at CLIP's input size == encode_image."""
    import copy

    img = torch.randn(3, 3, 64, 64)
    backbone = CLIPResNet(copy.deepcopy(tiny_clip.visual), ["res4"]).eval()
    pooler = ROIPooler((4, 4), (1 / 16,), 0, "ROIAlignV2")  # official: RoIAlign v2, adaptive sampling
    with torch.no_grad():
        ref = tiny_clip.encode_image(img)
        pooled = pooler([backbone(img)["res4"]], [Boxes(torch.tensor([[0.0, 0.0, 64.0, 64.0]]))] * 3)
        region = backbone.encode_pooled_regions(pooled)
    assert region.shape == ref.shape == (3, 64)
    assert ref.abs().max() > 0.1  # a meaningful comparison
    torch.testing.assert_close(region, ref, atol=EXACT_ATOL, rtol=0)


def test_attention_pool_single_query_matches_open_clip(tiny_clip):
    x = torch.randn(5, 512, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(attention_pool(tiny_clip.visual.attnpool, x),
                                   tiny_clip.visual.attnpool(x), atol=1e-5, rtol=1e-5)


def test_positional_embedding_interpolation():
    pos = torch.randn(1 + 7 * 7, 8)
    assert interpolate_positional_embedding(pos, 7, 7) is pos
    out = interpolate_positional_embedding(pos, 9, 5)
    assert out.shape == (1 + 45, 8)
    torch.testing.assert_close(out[0], pos[0])  # the mean token's embedding is kept
    # a constant grid stays constant under bicubic resizing
    const = torch.cat([torch.zeros(1, 4), torch.ones(49, 4)])
    torch.testing.assert_close(interpolate_positional_embedding(const, 3, 3)[1:], torch.ones(9, 4))
    with pytest.raises(ValueError, match="not a square"):
        interpolate_positional_embedding(torch.randn(1 + 10, 4), 2, 2)


def test_attention_pool_runs_on_non_native_grid(tiny_clip):
    out = attention_pool(tiny_clip.visual.attnpool, torch.randn(2, 512, 5, 3))
    assert out.shape == (2, 64) and torch.isfinite(out).all()


def _cfg(tiny_clip_config, **kw):
    cfg = get_regionclip_cfg("configs/Base-CLIP-C4.yaml",
                             ["MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config])
    for k, v in kw.items():
        cfg.merge_from_list([k, v])
    return cfg


def test_c4_backbone_shapes_and_freeze(tiny_clip_config):
    cfg = _cfg(tiny_clip_config, **{"MODEL.BACKBONE.FREEZE_AT": 2})
    bb = build_clip_resnet_backbone(cfg, ShapeSpec(channels=3))
    shapes = bb.output_shape()
    assert list(shapes) == ["res4"] and shapes["res4"].stride == 16 and shapes["res4"].channels == 256
    out = bb(torch.randn(1, 3, 96, 128))
    assert out["res4"].shape == (1, 256, 6, 8)
    assert not any(p.requires_grad for p in bb.conv1.parameters())
    assert not any(p.requires_grad for p in bb.layer1.parameters())
    assert all(p.requires_grad for p in bb.layer2.parameters())
    assert all(p.requires_grad for p in bb.layer4.parameters())  # res5 is trained in the RoI head
    bns = [m for m in bb.modules() if "BatchNorm" in type(m).__name__]
    assert bns and all(isinstance(m, FrozenBatchNorm2d) for m in bns)


def test_bn_norm_keeps_unfrozen_batchnorm(tiny_clip_config):
    cfg = _cfg(tiny_clip_config, **{"MODEL.RESNETS.NORM": "BN", "MODEL.BACKBONE.FREEZE_AT": 1})
    bb = build_clip_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert isinstance(bb.bn1, FrozenBatchNorm2d)
    assert isinstance(bb.layer1[0].bn1, torch.nn.BatchNorm2d)


def test_fpn_backbone(tiny_clip_config):
    cfg = get_regionclip_cfg("configs/Base-CLIP-FPN.yaml", ["MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config])
    bb = build_clip_resnet_fpn_backbone(cfg, ShapeSpec(channels=3))
    out = bb(torch.randn(1, 3, 128, 128))
    assert sorted(out) == ["p2", "p3", "p4", "p5", "p6"]
    assert out["p2"].shape == (1, 256, 32, 32) and out["p6"].shape[-1] == 2
    assert hasattr(bb.bottom_up, "attnpool")


def test_state_dict_keys_match_open_clip_visual(tiny_clip):
    import copy

    bb = CLIPResNet(copy.deepcopy(tiny_clip.visual), ["res4"])
    ref = {k for k in tiny_clip.visual.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(bb.state_dict()) == ref


@pytest.mark.parametrize("name", ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "RN50-quickgelu",
                                  "RN101-quickgelu"])
def test_every_open_clip_resnet_builds(name):
    assert name in resnet_model_names()
    with torch.device("meta"):  # no memory, no init cost: only the structure is checked
        visual, cfg = build_visual_tower(name)
        bb = CLIPResNet(visual, ["res4"], freeze_at=2)
    width = cfg["vision_cfg"]["width"]
    assert bb.output_shape()["res4"].channels == width * 16
    assert bb.embed_dim == cfg["embed_dim"]
    assert bb.attnpool.positional_embedding.shape[0] == (cfg["vision_cfg"]["image_size"] // 32) ** 2 + 1


def test_unknown_and_vit_models_are_rejected(tmp_path):
    with pytest.raises(UnknownCLIPModelError, match="unknown open_clip model 'RN42'.*MODEL.CLIP.OPENCLIP_MODEL"):
        get_clip_model_config("RN42")
    with pytest.raises(UnknownCLIPModelError, match="ViT image tower"):
        build_visual_tower("ViT-B-32")
    with pytest.raises(FileNotFoundError, match="OPENCLIP_MODEL_CONFIG"):
        get_clip_model_config("", str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match="lacks 'vision_cfg'"):
        get_clip_model_config("", str(bad))
