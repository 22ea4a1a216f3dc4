"""top_label_breakdown: the class of each ground-truth object's top-scoring overlapping detection."""
from regionclip_d2.evaluation.top_labels import top_label_breakdown


def test_top_label_breakdown_by_hand():
    gt = {"images": [{"id": 1}, {"id": 2}],
          "categories": [{"id": 1, "name": "circle", "split": "base"}, {"id": 2, "name": "square", "split": "base"},
                         {"id": 3, "name": "bolt", "split": "novel"}],
          "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},     # right (0.9 beats 0.5)
                          {"image_id": 1, "category_id": 2, "bbox": [50, 50, 10, 10]},   # taken by novel bolt
                          {"image_id": 2, "category_id": 2, "bbox": [0, 0, 20, 20]},     # wrong base (circle)
                          {"image_id": 2, "category_id": 3, "bbox": [60, 60, 10, 10]},   # right novel
                          {"image_id": 2, "category_id": 1, "bbox": [30, 0, 10, 10]}]}   # missed (IoU < 0.5)
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},
            {"image_id": 1, "category_id": 2, "bbox": [1, 1, 10, 10], "score": 0.5},
            {"image_id": 1, "category_id": 3, "bbox": [50, 50, 10, 11], "score": 0.7},
            {"image_id": 1, "category_id": 2, "bbox": [50, 50, 10, 10], "score": 0.6},
            {"image_id": 2, "category_id": 1, "bbox": [0, 0, 20, 19], "score": 0.8},
            {"image_id": 2, "category_id": 3, "bbox": [60, 60, 10, 10], "score": 0.4},
            {"image_id": 2, "category_id": 1, "bbox": [36, 0, 10, 10], "score": 0.99}]  # IoU 4/16 with the last GT
    r = top_label_breakdown(gt, dets)
    assert r["objects"] == 5 and r["missed"] == 1
    assert r["base"] == {"objects": 4, "right": 1, "wrong_same_split": 1, "other_split": 1}
    assert r["novel"] == {"objects": 1, "right": 1, "wrong_same_split": 0, "other_split": 0}
    assert r["other_split_labels"] == {"base": {"bolt": 1}}
    assert top_label_breakdown(gt, [])["missed"] == 5
