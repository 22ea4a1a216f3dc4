"""The CLIP ViT backbone: [CLS] path against open_clip, the dense (value) path against the last
block run with identity attention, positional-embedding interpolation, any input size, the
simple feature pyramid, and ViT / ResNet mix-ups."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP, TINY_VIT

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from regionclip_d2 import get_regionclip_cfg
from regionclip_d2.checkpoint.formats import CheckpointFormatError
from regionclip_d2.checkpoint.loading import load_clip_weights
from regionclip_d2.modeling.backbone.clip_vit import (
    CLIPViT,
    CLIPViTSimpleFeaturePyramid,
    ImageTooSmallError,
    interpolate_vit_positional_embedding,
)
from regionclip_d2.modeling.clip_model import UnknownCLIPModelError, build_clip_from_config, build_vit_tower


def _vit_config(**vision):
    cfg = copy.deepcopy(TINY_VIT)
    cfg["vision_cfg"].update(vision)
    return cfg


def _perturb(module, seed=0):
    """Non-trivial LayerNorm affine parameters (open_clip starts them at 1 / 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return module


@pytest.mark.parametrize("vision", [{}, {"pool_type": "avg"}, {"ls_init_value": 0.5},
                                    {"pool_type": "avg", "final_ln_after_pool": True}],
                         ids=["cls", "avg", "layerscale", "avg-ln-after-pool"])
def test_image_path_equals_open_clip_encode_image(vision):
    model = build_clip_from_config(_vit_config(**vision)).eval()
    _perturb(model.visual)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model.encode_image(x)
        got = CLIPViT(model.visual).encode_image(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_positional_embedding_interpolation():
    visual, _ = build_vit_tower("", model_config=TINY_VIT)
    pos = visual.positional_embedding.detach()
    # at the native 4x4 grid: the embedding itself; and the bicubic resampling at the same size is the identity too
    assert interpolate_vit_positional_embedding(pos, (4, 4), (4, 4)) is pos
    grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False), grid)
    out = interpolate_vit_positional_embedding(pos, (4, 4), (6, 8))
    assert out.shape == (1 + 48, pos.shape[1])
    assert torch.equal(out[0], pos[0])  # the [CLS] position is kept
    expected = F.interpolate(grid, size=(6, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[1:], expected.permute(0, 2, 3, 1).reshape(48, -1))
    with pytest.raises(ValueError, match="expected 1 \\+ 5x5"):
        interpolate_vit_positional_embedding(pos, (5, 5), (4, 4))


def test_dense_path_is_last_block_with_identity_attention():
    """The value path equals the last open_clip block run with an attention mask that lets
    each token attend only to itself, then ln_post and proj."""
    model = build_clip_from_config(_vit_config(ls_init_value=0.7)).eval()
    _perturb(model.visual, seed=1)
    bb = CLIPViT(model.visual)
    x = torch.randn(2, 3, 40, 56)  # not the native size: 5x7 grid, interpolated positions
    with torch.no_grad():
        tokens, (gh, gw) = bb.penultimate_tokens(x)
        n = tokens.shape[1]
        mask = torch.full((n, n), float("-inf"))
        mask.fill_diagonal_(0.0)
        z = model.visual.transformer.resblocks[-1](tokens, attn_mask=mask)[:, 1:]
        expected = (model.visual.ln_post(z) @ model.visual.proj).transpose(1, 2).reshape(2, -1, gh, gw)
        dense = bb(x)["dense"]
    assert dense.shape == (2, 24, 5, 7)
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)
    # the dense map is not the image path: with full attention the [CLS] token differs from any patch
    assert bb.output_shape()["dense"] == ShapeSpec(channels=24, stride=8)


def test_any_input_size_and_native_size_tokens():
    bb = CLIPViT(build_vit_tower("", model_config=TINY_VIT)[0]).eval()
    with torch.no_grad():
        assert bb(torch.randn(1, 3, 32, 32))["dense"].shape == (1, 24, 4, 4)
        assert bb(torch.randn(1, 3, 50, 70))["dense"].shape == (1, 24, 6, 8)  # floors like the patch conv
        assert bb(torch.randn(1, 3, 8, 8))["dense"].shape == (1, 24, 1, 1)  # one patch
        with pytest.raises(ImageTooSmallError, match="7x20 pixels is smaller than one 8x8 patch.*at least 8"):
            bb(torch.randn(1, 3, 7, 20))


def test_open_clip_vit_by_name():
    cfg = get_regionclip_cfg(None, ["MODEL.CLIP.OPENCLIP_MODEL", "ViT-B-32", "MODEL.BACKBONE.NAME",
                                    "build_clip_vit_backbone"])
    bb = build_backbone(cfg).eval()
    assert bb.patch_size == 32 and bb.native_grid == (7, 7) and bb.embed_dim == 512
    with torch.no_grad():
        assert bb(torch.randn(1, 3, 64, 96))["dense"].shape == (1, 512, 2, 3)


def test_simple_feature_pyramid(tiny_vit_config):
    cfg = get_regionclip_cfg(None, ["MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_vit_config, "MODEL.BACKBONE.NAME",
                                    "build_clip_vit_sfp_backbone", "MODEL.FPN.OUT_CHANNELS", 16,
                                    "MODEL.BACKBONE.FREEZE_AT", 1])
    sfp = build_backbone(cfg).eval()
    assert isinstance(sfp, CLIPViTSimpleFeaturePyramid) and sfp.size_divisibility == 32
    assert {k: v.stride for k, v in sfp.output_shape().items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
    assert not any(p.requires_grad for p in sfp.bottom_up.parameters())  # FREEZE_AT > 0: the ViT frozen
    assert all(p.requires_grad for p in sfp.stages.parameters())
    with torch.no_grad():
        out = sfp(torch.randn(2, 3, 64, 96))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {"p2": (16, 24), "p3": (8, 12), "p4": (4, 6),
                                                                "p5": (2, 3)}


def test_vit_and_resnet_mixups(tiny_vit_config, tiny_clip_config, tmp_path):
    vit_cfg = ["MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_vit_config]
    res_cfg = ["MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config]
    # a ViT config given to the ResNet backbone, and the reverse
    with pytest.raises(UnknownCLIPModelError, match="ViT image tower but the CLIP ResNet backbone.*build_clip_vit"):
        build_backbone(get_regionclip_cfg(None, vit_cfg + ["MODEL.BACKBONE.NAME", "build_clip_resnet_backbone"]))
    with pytest.raises(UnknownCLIPModelError, match="ResNet image tower but the CLIP ViT backbone.*build_clip_resnet"):
        build_backbone(get_regionclip_cfg(None, res_cfg + ["MODEL.BACKBONE.NAME", "build_clip_vit_backbone"]))
    with pytest.raises(UnknownCLIPModelError, match="ViT-B-16"):
        build_backbone(get_regionclip_cfg(None, ["MODEL.CLIP.OPENCLIP_MODEL", "RN50",
                                                 "MODEL.BACKBONE.NAME", "build_clip_vit_backbone"]))
    # a ViT checkpoint given to the ResNet backbone, and the reverse
    vit_file, res_file = tmp_path / "vit.pth", tmp_path / "rn.pth"
    torch.save(build_clip_from_config(TINY_VIT).state_dict(), vit_file)
    torch.save(build_clip_from_config(TINY_CLIP).state_dict(), res_file)
    resnet = build_backbone(get_regionclip_cfg(None, res_cfg + ["MODEL.BACKBONE.NAME", "build_clip_resnet_backbone"]))
    vit = build_backbone(get_regionclip_cfg(None, vit_cfg + ["MODEL.BACKBONE.NAME", "build_clip_vit_backbone"]))
    with pytest.raises(CheckpointFormatError, match="CLIP ViT image tower but the backbone is a CLIP ResNet.*"
                                                    "build_clip_vit_backbone"):
        load_clip_weights(str(vit_file), backbone=resnet)
    with pytest.raises(CheckpointFormatError, match="CLIP ResNet image tower but the backbone is a CLIP ViT.*"
                                                    "build_clip_resnet_backbone"):
        load_clip_weights(str(res_file), backbone=vit)
    load_clip_weights(str(vit_file), backbone=vit)  # the right pair loads
    ref = torch.load(vit_file, weights_only=True)
    assert torch.equal(vit.class_embedding, ref["visual.class_embedding"])
