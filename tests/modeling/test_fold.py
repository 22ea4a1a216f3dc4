"""Folding frozen BatchNorms into convolutions (regionclip_d2.modeling.fold, measured by
bench/fold_frozen_bn.py): the folded CLIP ResNet and detectron2 ResNet-FPN compute what the
originals compute, none of their FrozenBNs is left, and the originals are untouched."""
import pytest
import torch
from conftest import randomize_batchnorm_stats

from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone

from regionclip_d2 import get_regionclip_cfg
from regionclip_d2.modeling.fold import fold_frozen_batchnorm, folded_copy


def _count(m):
    return sum(isinstance(x, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)) for x in m.modules())


def test_folded_clip_resnet_equals_the_original(tiny_clip_config):
    cfg = get_regionclip_cfg("configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_FPN_zsinf_GT.yaml",
                             ["MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config, "MODEL.CLIP.TEXT_EMB_DIM", 64])
    torch.manual_seed(0)
    backbone = build_backbone(cfg).eval()
    randomize_batchnorm_stats(backbone)
    n = _count(backbone)
    assert n > 10
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    folded = folded_copy(backbone)
    assert _count(folded) == 0 and _count(backbone) == n
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())  # the original is untouched
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ref, got = backbone(x), folded(x)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-4, rtol=1e-4)
        pooled = torch.randn(3, 256, 4, 4)  # res5 + attention pool on regions (the C4 box head)
        torch.testing.assert_close(folded.bottom_up.encode_pooled_regions(pooled),
                                   backbone.bottom_up.encode_pooled_regions(pooled), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])  # BN in eval mode: a trained RPN branch's
def test_folded_detectron2_resnet_fpn_equals_the_original(norm):
    cfg = get_regionclip_cfg("configs/synthetic/rpn_R_18_FPN_world.yaml", ["MODEL.RESNETS.NORM", norm])
    torch.manual_seed(0)
    backbone = build_backbone(cfg).eval()
    randomize_batchnorm_stats(backbone)
    assert _count(backbone) > 10
    folded = folded_copy(backbone)
    assert _count(folded) == 0
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref, got = backbone(x), folded(x)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-4, rtol=1e-4)
    assert fold_frozen_batchnorm(folded) == 0  # nothing left to fold
    if norm == "BN":  # a BatchNorm in training mode is not a fixed map: left alone
        assert fold_frozen_batchnorm(backbone.train()) == 0
