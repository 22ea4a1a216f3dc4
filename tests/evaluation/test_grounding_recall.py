"""Phrase grounding recall@k (Flickr30k Entities protocol) on hand-made cases."""
import pytest

from detectron2.structures import BoxMode

from regionclip_d2.evaluation.grounding_recall import phrase_recall, phrase_targets


def test_phrase_targets_group_by_spans_and_take_the_union_box():
    caption = "two dogs chase a red ball"
    d = {"caption": caption, "annotations": [
        {"bbox": [0, 0, 10, 10], "bbox_mode": BoxMode.XYWH_ABS, "tokens_positive": [[0, 8]]},
        {"bbox": [20, 5, 10, 20], "bbox_mode": BoxMode.XYWH_ABS, "tokens_positive": [[0, 8]]},
        {"bbox": [50, 50, 60, 60], "bbox_mode": BoxMode.XYXY_ABS, "tokens_positive": [[15, 25]]},
    ]}
    t = phrase_targets(d)
    assert [x["phrase"] for x in t] == ["two dogs", "a red ball"]
    assert t[0]["box"] == [0.0, 0.0, 30.0, 25.0]  # the union of both dogs
    assert t[1]["box"] == [50.0, 50.0, 60.0, 60.0]
    assert t[1]["spans"] == [[15, 25]]


def test_recall_at_k_by_hand():
    gt = [[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60], [0, 0, 5, 5]]
    miss = [70, 70, 80, 80]
    ranked = [
        [[0, 0, 10, 10]],                      # found at rank 1
        [miss, miss, [21, 21, 40, 40]],        # found at rank 3 (IoU 0.9)
        [miss] * 10 + [[50, 50, 60, 60]],      # found only at rank 11: a miss at 1, 5 and 10
        [],                                    # no box: a miss
    ]
    r = phrase_recall(ranked, gt)
    assert r == {"R@1": 25.0, "R@5": 50.0, "R@10": 50.0, "phrases": 4}
    # IoU exactly at the threshold counts; just below does not
    half = [[0, 0, 10, 5]]  # IoU 0.5 with [0, 0, 10, 10]
    assert phrase_recall([half], [gt[0]], ks=(1,))["R@1"] == 100.0
    assert phrase_recall([[[0, 0, 10, 4.9]]], [gt[0]], ks=(1,))["R@1"] == 0.0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="one per phrase"):
        phrase_recall([[]], [])
    with pytest.raises(ValueError, match="at least 1"):
        phrase_recall([[]], [[0, 0, 1, 1]], ks=(0,))
