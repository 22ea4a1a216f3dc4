"""Per-class score thresholds: resolving, reading from JSON, calibrating to a target precision."""
import json

import numpy as np
import pytest

from detectron2.structures import BoxMode

from regionclip_d2 import Detections
from regionclip_d2.evaluation.thresholds import (
    ThresholdError,
    calibrate_thresholds,
    class_thresholds,
    load_class_thresholds,
)


def test_class_thresholds_and_their_file(tmp_path):
    names = ["cat", "dog", "bird"]
    np.testing.assert_array_equal(class_thresholds(0.4, names), [0.4, 0.4, 0.4])
    np.testing.assert_array_equal(class_thresholds({"dog": 0.7}, names, default=0.1), [0.1, 0.7, 0.1])
    with pytest.raises(ThresholdError, match=r"not in the vocabulary: \['dgo'\]"):
        class_thresholds({"dgo": 0.7}, names)
    for bad in (float("inf"), "0.5", True, None):
        with pytest.raises(ThresholdError, match="finite number"):
            class_thresholds({"dog": bad}, names)
    path = tmp_path / "thr.json"
    path.write_text(json.dumps({"cat": 0.5, "bird": 1}))
    assert load_class_thresholds(str(path)) == {"cat": 0.5, "bird": 1.0}
    path.write_text("[0.5]")
    with pytest.raises(ThresholdError, match="one JSON object"):
        load_class_thresholds(str(path))
    path.write_text("{")
    with pytest.raises(ThresholdError, match="not valid JSON"):
        load_class_thresholds(str(path))
    with pytest.raises(ThresholdError, match="does not exist"):
        load_class_thresholds(str(tmp_path / "none.json"))


def test_calibrate_thresholds_by_hand():
    names = ["cat", "dog", "bird"]
    A, B, D = [0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]
    crowd = [100, 0, 140, 40]
    dicts = [
        {"image_id": 1, "annotations": [{"bbox": [0, 0, 10, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},
                                        {"bbox": [100, 0, 40, 40], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
                                         "iscrowd": 1}]},
        {"image_id": 2, "annotations": [{"bbox": B, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},
                                        {"bbox": D, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1}]},
    ]
    # cat: 0.9 on A (TP), 0.8 nowhere (FP), 0.75 on the crowd region (ignored), 0.7 on B (TP),
    # 0.6 on A again (FP: A is taken), 0.5 nowhere (FP). Precision at >= 0.9, 0.8, 0.7, 0.6, 0.5:
    # 1/1, 1/2, 2/3, 2/4, 2/5. dog: 0.4 on a box with IoU 0.43 with D (FP at IoU 0.5). bird: nothing.
    dog_box = [54, 50, 64, 60]  # intersection 6 x 10 = 60, union 140: IoU 0.43
    dets = [
        {"boxes": [A, [70, 70, 80, 80], crowd, A], "scores": [0.9, 0.8, 0.75, 0.6], "labels": ["cat"] * 4},
        {"boxes": [B, [0, 0, 5, 5], dog_box], "scores": [0.7, 0.5, 0.4], "label_ids": [0, 0, 1]},
    ]
    thr, stats = calibrate_thresholds(dets, dicts, names, target_precision=0.9, return_stats=True)
    assert thr == {"cat": 0.9, "dog": pytest.approx(0.4 + 1e-6), "bird": pytest.approx(1.0 + 1e-6)}
    assert stats["cat"] == {"precision": 1.0, "recall": 0.5, "num_gt": 2, "num_detections": 5, "reached": True}
    assert stats["dog"]["reached"] is False and stats["bird"]["num_detections"] == 0
    # the lowest threshold reaching the target wins, although precision is not monotonic
    assert calibrate_thresholds(dets, dicts, names, target_precision=0.6)["cat"] == 0.7
    assert calibrate_thresholds(dets, dicts, names, target_precision=0.5)["cat"] == 0.6
    assert calibrate_thresholds(dets, dicts, names, target_precision=0.4)["cat"] == 0.5
    # a looser IoU makes the dog detection a true positive
    assert calibrate_thresholds(dets, dicts, names, target_precision=0.9, iou=0.4)["dog"] == 0.4
    # a mapping by image_id, Detections and Instances are accepted alike
    by_id = {1: dets[0], 2: Detections(boxes=np.array(dets[1]["boxes"], np.float32),
                                       scores=np.array(dets[1]["scores"], np.float32), labels=["cat", "cat", "dog"],
                                       label_ids=np.array([0, 0, 1]), class_names=names, image_size=(200, 200))}
    assert calibrate_thresholds(by_id, dicts, names) == pytest.approx(thr)
    with pytest.raises(ValueError, match="one per image"):
        calibrate_thresholds(dets[:1], dicts, names)
