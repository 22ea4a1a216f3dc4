"""The evaluators report AP = 100 when the ground truth is fed back as detections."""
import json

import numpy as np
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_lvis_instances
from detectron2.structures import Boxes, Instances

from regionclip_d2.data.datasets import register_coco_format
from regionclip_d2.data.vocabularies import lvis_categories
from regionclip_d2.evaluation import build_evaluator


def feed_ground_truth(evaluator, dicts, contiguous):
    evaluator.reset()
    for d in dicts:
        anns = d["annotations"]
        inst = Instances((d["height"], d["width"]))
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY
        inst.pred_boxes = Boxes(boxes)
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.tensor([contiguous(a["category_id"]) for a in anns])
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    return evaluator.evaluate()


def _images(tmp_path, n):
    from PIL import Image

    (tmp_path / "img").mkdir(exist_ok=True)
    for i in range(n):
        Image.new("RGB", (120, 100)).save(tmp_path / "img" / f"{i}.jpg")
    return [{"id": i + 1, "file_name": f"{i}.jpg", "height": 100, "width": 120,
             "coco_url": f"http://x/{i}.jpg", "neg_category_ids": [], "not_exhaustive_category_ids": []}
            for i in range(n)]


def test_coco_evaluator_ground_truth_is_perfect(tmp_path):
    from regionclip_d2 import get_regionclip_cfg

    cats = [{"id": 1, "name": "star"}, {"id": 2, "name": "ring"}]
    rng = np.random.default_rng(0)
    anns = [{"id": k + 1, "image_id": k % 3 + 1, "category_id": int(rng.integers(1, 3)),
             "bbox": [float(rng.integers(0, 60)), float(rng.integers(0, 50)), 30.0, 25.0], "area": 750.0,
             "iscrowd": 0} for k in range(6)]
    ann = tmp_path / "coco.json"
    ann.write_text(json.dumps({"images": _images(tmp_path, 3), "annotations": anns, "categories": cats}))
    register_coco_format("toy_coco_eval", str(ann), str(tmp_path / "img"))
    dicts = DatasetCatalog.get("toy_coco_eval")
    meta = MetadataCatalog.get("toy_coco_eval")
    cfg = get_regionclip_cfg("configs/Base-CLIP-C4.yaml", ["OUTPUT_DIR", str(tmp_path / "out")])
    evaluator = build_evaluator(cfg, "toy_coco_eval")
    for d in dicts:  # the loader gives contiguous ids; evaluate against dataset ids
        for a in d["annotations"]:
            a["category_id"] = [k for k, v in meta.thing_dataset_id_to_contiguous_id.items()
                                if v == a["category_id"]][0]
    res = feed_ground_truth(evaluator, dicts, lambda cid: meta.thing_dataset_id_to_contiguous_id[cid])
    assert res["bbox"]["AP"] == pytest.approx(100.0) and res["bbox"]["AP50"] == pytest.approx(100.0)


def test_lvis_evaluator_ground_truth_is_perfect(tmp_path):
    from regionclip_d2 import get_regionclip_cfg

    cats = [{"id": c["id"], "name": c["name"], "synonyms": c["synonyms"], "frequency": c["frequency"],
             "image_count": 1, "instance_count": 1} for c in lvis_categories()]
    ids = [13, 1, 3]  # one rare, one common, one frequent LVIS category
    freq = {c["id"]: c["frequency"] for c in cats}
    assert sorted(freq[i] for i in ids) == ["c", "f", "r"]
    anns = [{"id": k + 1, "image_id": k % 3 + 1, "category_id": ids[k % 3], "bbox": [10.0 + k, 5.0, 40.0, 30.0],
             "area": 1200.0, "segmentation": [[10.0 + k, 5.0, 50.0 + k, 5.0, 50.0 + k, 35.0, 10.0 + k, 35.0]]}
            for k in range(6)]
    ann = tmp_path / "lvis_v1_toy.json"
    ann.write_text(json.dumps({"images": _images(tmp_path, 3), "annotations": anns, "categories": cats}))
    name = "lvis_v1_toy_eval"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_lvis_instances(name, {}, str(ann), str(tmp_path / "img"))
    dicts = DatasetCatalog.get(name)
    cfg = get_regionclip_cfg("configs/Base-CLIP-C4.yaml", ["OUTPUT_DIR", str(tmp_path / "out")])
    evaluator = build_evaluator(cfg, name)
    for d in dicts:
        for a in d["annotations"]:
            a["category_id"] += 1  # loader: contiguous 0-based; dataset ids are 1-based
    res = feed_ground_truth(evaluator, dicts, lambda cid: cid - 1)
    for key in ("AP", "APr", "APc", "APf"):
        assert res["bbox"][key] == pytest.approx(100.0), key
