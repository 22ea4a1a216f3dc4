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


def test_folded_copy_shares_what_it_does_not_fold(tiny_clip_config):
    """The copy costs only the folded convolutions' weights: the rest (here the attention pool)
    is the original's tensors; with channels_last every convolution weight of the copy is
    channels-last, while the original keeps its own format and requires_grad."""
    cfg = get_regionclip_cfg("configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml",
                             ["MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config, "MODEL.CLIP.TEXT_EMB_DIM", 64])
    torch.manual_seed(0)
    backbone = build_backbone(cfg).eval()
    randomize_batchnorm_stats(backbone)
    grads = {k: p.requires_grad for k, p in backbone.named_parameters()}
    folded = folded_copy(backbone, channels_last=True)
    orig = dict(backbone.named_parameters())
    new = dict(folded.named_parameters())
    pool = [k for k in new if "attnpool" in k]
    assert pool and all(new[k] is orig[k] for k in pool)
    convs = [m for m in folded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert not any(m.weight.data_ptr() == p.data_ptr() for m in convs for p in orig.values())
    assert {k: p.requires_grad for k, p in orig.items()} == grads and any(grads.values())
    assert not any(m.weight.is_contiguous(memory_format=torch.channels_last)
                   for m in backbone.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ref, got = backbone(x), folded(x)
    assert got["res4"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got["res4"], ref["res4"], atol=1e-4, rtol=1e-4)


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


@pytest.mark.parametrize("config", ["configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml",
                                    "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_FPN_zsinf.yaml"])
def test_fold_batchnorm_option_gives_the_same_detections(config, tiny_clip_config):
    """MODEL.CLIP.FOLD_BATCHNORM (the default): RPN mode through folded copies of both backbones (and of res5
    on the regions in C4) gives the unfolded detections; the model's own modules, state dict
    and training are untouched, and the copies follow weight changes."""
    import copy

    from helpers import image_input, tiny_cfg

    from detectron2.modeling import build_model

    cfg = tiny_cfg(config, tiny_clip_config, extra=["MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST", 40,
                                                    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    randomize_batchnorm_stats(model.backbone)
    head = model.offline_proposal_generator.rpn_head
    with torch.no_grad():  # random deltas would collapse the proposals: keep the anchors (their BatchNorms are
        head.anchor_deltas.weight.zero_()  # detectron2's initial ones, folded too; randomised ones: tests above)
        head.anchor_deltas.bias.zero_()
    x = [image_input(96, 128, seed=3)]
    assert model.fold_batchnorm  # the config's default
    model.fold_batchnorm = False
    ref = model(x)[0]["instances"]
    keys = set(model.state_dict())
    model.fold_batchnorm = True
    calls = []
    real = model.folded_modules
    model.folded_modules = lambda: (calls.append(1), real())[1]
    out = model(x)[0]["instances"]
    assert calls and _count(model.folded_modules()["backbone"]) == 0
    assert _count(model.folded_modules()["offline_backbone"]) == 0
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)  # oneDNN's fast layout on CPU
               for c in model.folded_modules().values() for m in c.modules() if isinstance(m, torch.nn.Conv2d))
    assert len(out) == len(ref) > 0
    torch.testing.assert_close(out.scores, ref.scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.pred_boxes.tensor, ref.pred_boxes.tensor, atol=1e-3, rtol=0)
    assert torch.equal(out.pred_classes, ref.pred_classes)
    assert set(model.state_dict()) == keys and _count(model.backbone) > 0  # the model keeps its BatchNorms
    copy.deepcopy(model)  # no lock or thread-local state in the model
    # new weights: the folded copies are made again
    sd = {k: v + 0.05 if k.startswith("backbone.") and k.endswith("running_mean") else v
          for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    model.fold_batchnorm = False
    ref2 = model(x)[0]["instances"]
    model.fold_batchnorm = True
    out2 = model(x)[0]["instances"]
    torch.testing.assert_close(out2.scores, ref2.scores, atol=1e-4, rtol=0)
    assert len(ref2) != len(ref) or not torch.allclose(ref2.scores, ref.scores, atol=1e-6)  # the weights mattered
