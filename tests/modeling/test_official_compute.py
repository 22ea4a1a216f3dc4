"""The benchmark's official-compute baseline (bench/official_compute.py), against which speed-ups
are reported, computes what the detector computes: same detections, in GT and RPN mode, and
with the opt-in channels-last path; its operation counts match hand counts."""
import os
import sys

import pytest
import torch
from helpers import image_input, tiny_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import official_compute as oc  # noqa: E402

C4_GT = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml"
C4_RPN = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml"
BOXES = [[4, 4, 60, 50], [30, 20, 120, 90], [0, 0, 128, 96], [50, 10, 70, 40], [5, 60, 40, 95]]


@pytest.mark.parametrize("config,extra", [(C4_GT, []), (C4_RPN, ["MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST", 80]),
                                          (C4_GT, ["MODEL.CLIP.CHANNELS_LAST", True])])
def test_official_compute_gives_the_detectors_detections(tiny_clip_config, config, extra):
    model = tiny_model(config, tiny_clip_config, extra=extra)
    if model.offline_proposal_generator is not None:  # zero deltas: the proposals are anchors, not one box
        head = model.offline_proposal_generator.rpn_head
        torch.nn.init.zeros_(head.anchor_deltas.weight)
        torch.nn.init.zeros_(head.anchor_deltas.bias)
    x = [image_input(96, 128, boxes=BOXES if config == C4_GT else None)]
    ours = model(x)
    clock = oc._Clock()
    official = oc.official_inference(model, x, clock)
    assert len(ours[0]["instances"]) >= 5
    both = oc.compare_detections(official, ours), oc.compare_detections(ours, official)
    assert all(c["share"] == 1.0 and c["max_score_diff"] <= 1e-4 for c in both), both
    expected = {"backbone_res4", "roialign", "res5", "attnpool", "classifier", "postprocess"}
    assert expected | ({"rpn_branch"} if config == C4_RPN else set()) == set(clock.t)


def test_compare_detections_notices_a_different_detection(tiny_clip_config):
    model = tiny_model(C4_GT, tiny_clip_config)
    x = [image_input(96, 128, boxes=BOXES)]
    ours = model(x)
    other = [{"instances": ours[0]["instances"][:]}]
    other[0]["instances"].pred_classes = other[0]["instances"].pred_classes.clone()
    other[0]["instances"].pred_classes[0] += 1
    c = oc.compare_detections(ours, other)
    assert c["matched"] == c["detections"] - 1


def test_operation_counts_by_hand(tiny_clip_config):
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, groups=1)
    lin = torch.nn.Linear(8, 5)
    net = torch.nn.Sequential(conv, torch.nn.Flatten(2), torch.nn.Identity())
    macs = oc._conv_linear_macs(net, lambda: net(torch.zeros(2, 3, 10, 12)))
    assert macs == 2 * 8 * 10 * 12 * 3 * 9
    assert oc._conv_linear_macs(lin, lambda: lin(torch.zeros(7, 8))) == 7 * 5 * 8
    model = tiny_model(C4_GT, tiny_clip_config)
    ap = model.clip_resnet.attnpool
    c = ap.q_proj.in_features
    # all queries: q, k, v of 5 tokens, 5x5 attention over c channels (scores and mixing), output projection
    assert oc.attnpool_macs(ap, 3, 5, True) == 3 * (3 * 5 * c * c + 2 * 25 * c + c * ap.c_proj.out_features)
    g = oc.count_flops(model, [image_input(96, 128, boxes=BOXES)], 3)
    assert g["attnpool"] > g["attnpool_one_query"] > 0 and g["res5"] > 0 and g["backbone_res4"] > 0
    assert "rpn_branch" not in g


def test_stage_timer_follows_deep_copies():
    """bench/run.py's stage timer patches module methods in place; a deep copy of a patched module
    (the detector's folded inference copies) must run, and time, its own method, not the original's."""
    import copy

    import run as bench_run

    timer = bench_run.StageTimer()
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    timer.patch(lin, "forward", "linear")
    dup = copy.deepcopy(lin)
    with torch.no_grad():
        dup.weight.zero_()
        dup.bias.fill_(1.0)
    x = torch.randn(4, 3)
    assert torch.equal(dup(x), torch.ones(4, 2))  # the copy's own weights
    assert "linear" in timer.t
    timer.reset()
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    assert "linear" in timer.t
