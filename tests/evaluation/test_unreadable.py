"""Evaluation leaves out images it cannot read (logged, counted, AP over the rest) and stops
when too many, or all, fail."""
import json
import logging

import numpy as np
import pytest
import torch
from helpers import exif_rotated_copy, make_coco
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.structures import Boxes, Instances

from regionclip_d2 import get_regionclip_cfg
from regionclip_d2.data.datasets import register_coco_format
from regionclip_d2.engine.trainer import RegionCLIPTrainer
from regionclip_d2.evaluation import UnreadableImagesError, build_evaluator
from regionclip_d2.evaluation.unreadable import UNREADABLE, UnreadableImageGuard, too_many_unreadable


class GroundTruthModel(torch.nn.Module):
    """Predicts each image's ground truth (at its original size): AP 100 on every image it sees."""

    def __init__(self, boxes):
        super().__init__()
        self.boxes = boxes  # image_id -> [(x0, y0, x1, y1, contiguous class)]
        self.seen = []

    def forward(self, inputs):
        outs = []
        for x in inputs:
            self.seen.append(x["image_id"])
            assert "image" in x and x["image"].dtype == torch.uint8
            rows = torch.tensor(self.boxes[x["image_id"]], dtype=torch.float32)
            inst = Instances((x["height"], x["width"]), pred_boxes=Boxes(rows[:, :4]), scores=torch.ones(len(rows)),
                             pred_classes=rows[:, 4].long())
            outs.append({"instances": inst})
        return outs


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _setup(tmp_path, name, n_images=8):
    ann, images = make_coco(tmp_path, n_images=n_images, seed=1)
    exif_rotated_copy(images, ann, n_images - 3)
    register_coco_format(name, str(ann), str(images))
    boxes = {}
    for d in DatasetCatalog.get(name):  # contiguous class ids, XYWH boxes
        boxes[d["image_id"]] = [(x, y, x + w, y + h, a["category_id"]) for a in d["annotations"]
                                for x, y, w, h in [a["bbox"]]]
    cfg = get_regionclip_cfg("configs/Base-CLIP-C4.yaml")
    cfg.merge_from_list(["DATASETS.TEST", (name,), "OUTPUT_DIR", str(tmp_path / "out"), "DATALOADER.NUM_WORKERS", 0,
                         "INPUT.MIN_SIZE_TEST", 96, "MODEL.DEVICE", "cpu"])
    return cfg, images, GroundTruthModel(boxes)


@pytest.fixture
def dataset_name():
    name = "unreadable_eval_test"
    yield name
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_unreadable_images_are_left_out_logged_and_counted(tmp_path, dataset_name, caplog):
    cfg, images, model = _setup(tmp_path, dataset_name)
    _truncate(images / "2.png")
    with caplog.at_level(logging.WARNING):
        results = RegionCLIPTrainer.test(cfg, model)[dataset_name]
    # the EXIF-rotated image (annotated at its stored size) is read; the truncated one is not
    assert sorted(model.seen) == [1, 2, 4, 5, 6, 7, 8]
    # AP over the 7 images read: perfect. Counting the missing image's objects as missed would give less
    assert results["bbox"]["AP"] == pytest.approx(100.0) and results["bbox"]["AP50"] == pytest.approx(100.0)
    assert results["images"] == {"total": 8, "evaluated": 7, "unreadable": 1}
    saved = json.loads((tmp_path / "out" / "inference" / dataset_name / "results.json").read_text())
    assert saved["images"] == results["images"]
    assert [x["file_name"].rsplit("/", 1)[1] for x in saved["unreadable_images"]] == ["2.png"]
    assert "truncated" in saved["unreadable_images"][0]["reason"]
    log = caplog.text
    assert "CANNOT READ IMAGE" in log and "2.png" in log
    assert "1 of 8 images could not be read and are excluded" in log and "AP is over the 7 images read" in log
    for v in flatten_results_dict(results).values():  # end-of-training evaluation (EvalHook) needs floats
        float(v)


def test_without_unreadable_images_nothing_changes(tmp_path, dataset_name, caplog):
    cfg, _, model = _setup(tmp_path, dataset_name, n_images=4)
    with caplog.at_level(logging.WARNING):
        results = RegionCLIPTrainer.test(cfg, model)[dataset_name]
    assert results["images"] == {"total": 4, "evaluated": 4, "unreadable": 0}
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert "CANNOT READ" not in caplog.text and "could not be read" not in caplog.text


def test_too_many_unreadable_images_stop_the_evaluation(tmp_path, dataset_name):
    cfg, images, model = _setup(tmp_path, dataset_name)
    _truncate(images / "1.png")
    (images / "3.png").write_bytes(b"not an image")
    cfg.merge_from_list(["TEST.MAX_UNREADABLE_FRACTION", 0.2])  # 2 of 8 > max(1.6, 1)
    with pytest.raises(UnreadableImagesError, match=r"2 of 8 images could not be read.*1\.png.*3\.png.*"
                                                    r"TEST.MAX_UNREADABLE_FRACTION"):
        RegionCLIPTrainer.test(cfg, model)
    cfg.merge_from_list(["TEST.MAX_UNREADABLE_FRACTION", 0.25])  # 2 of 8 is not more than 25%
    assert RegionCLIPTrainer.test(cfg, model)[dataset_name]["images"]["unreadable"] == 2


def test_every_image_unreadable_is_an_error_whatever_the_ceiling(tmp_path, dataset_name):
    cfg, images, model = _setup(tmp_path, dataset_name, n_images=3)
    for p in images.iterdir():
        p.write_bytes(b"junk")
    cfg.merge_from_list(["TEST.MAX_UNREADABLE_FRACTION", 1.0])
    with pytest.raises(UnreadableImagesError,
                       match=r"none of the 3 images could be read.*0_exif\.jpg.*2\.png.*image folder"):
        RegionCLIPTrainer.test(cfg, model)
    assert model.seen == []


def test_ceiling_rule():
    assert not too_many_unreadable(0, 10, 0.05)
    assert not too_many_unreadable(1, 10, 0.05)  # one bad image never stops a larger evaluation
    assert too_many_unreadable(2, 10, 0.05)
    assert not too_many_unreadable(5, 100, 0.05) and too_many_unreadable(6, 100, 0.05)
    assert too_many_unreadable(1, 1, 1.0) and too_many_unreadable(4, 4, 1.0)  # all failed
    with pytest.raises(ValueError, match="MAX_UNREADABLE_FRACTION"):
        UnreadableImageGuard(None, 10, max_fraction=1.5)


def test_lvis_evaluation_leaves_unreadable_images_out(tmp_path):
    from detectron2.data.datasets import register_lvis_instances

    from regionclip_d2.data.vocabularies import lvis_categories

    cats = [{"id": c["id"], "name": c["name"], "synonyms": c["synonyms"], "frequency": c["frequency"],
             "image_count": 1, "instance_count": 1} for c in lvis_categories()]
    ids = [13, 1, 3]  # one rare, one common, one frequent category, each on two of the four images
    (tmp_path / "img").mkdir()
    images = []
    for i in range(4):
        Image.new("RGB", (120, 100)).save(tmp_path / "img" / f"{i}.jpg")
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": 100, "width": 120, "coco_url": f"http://x/{i}",
                       "neg_category_ids": [], "not_exhaustive_category_ids": []})
    anns = [{"id": k + 1, "image_id": k % 4 + 1, "category_id": ids[k % 3], "bbox": [10.0 + k, 5.0, 40.0, 30.0],
             "area": 1200.0, "segmentation": [[10.0 + k, 5.0, 50.0 + k, 5.0, 50.0 + k, 35.0, 10.0 + k, 35.0]]}
            for k in range(8)]
    ann = tmp_path / "lvis_v1_toy.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    name = "lvis_v1_unreadable_test"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_lvis_instances(name, {}, str(ann), str(tmp_path / "img"))
    try:
        dicts = DatasetCatalog.get(name)
        cfg = get_regionclip_cfg("configs/Base-CLIP-C4.yaml", ["OUTPUT_DIR", str(tmp_path / "out")])
        guard = UnreadableImageGuard(build_evaluator(cfg, name), num_images=len(dicts), dataset_name=name)
        guard.reset()
        for d in dicts:
            if d["image_id"] == 2:  # the placeholder of an image that could not be read
                guard.process([{"file_name": d["file_name"], "image_id": 2, UNREADABLE: "OSError: truncated"}], [{}])
                continue
            boxes = torch.tensor([a["bbox"] for a in d["annotations"]], dtype=torch.float32)
            boxes[:, 2:] += boxes[:, :2]
            inst = Instances((d["height"], d["width"]), pred_boxes=Boxes(boxes), scores=torch.ones(len(boxes)),
                             pred_classes=torch.tensor([a["category_id"] for a in d["annotations"]]))
            guard.process([{"image_id": d["image_id"]}], [{"instances": inst}])
        res = guard.evaluate()
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    for key in ("AP", "APr", "APc", "APf"):
        assert res["bbox"][key] == pytest.approx(100.0), key
    assert res["images"] == {"total": 4, "evaluated": 3, "unreadable": 1}
    assert [x["image_id"] for x in guard.all_unreadable] == [2]


def test_region_classification_leaves_unreadable_images_out(tmp_path, tiny_clip_config, caplog):
    from helpers import tiny_model

    from regionclip_d2.data.mappers import build_test_mapper
    from regionclip_d2.evaluation.region_classification import region_classification_accuracy

    ann, images = make_coco(tmp_path, n_images=3)
    name = "unreadable_region_cls_test"
    register_coco_format(name, str(ann), str(images))
    try:
        dicts = DatasetCatalog.get(name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    config = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml"
    names = ("red square", "green square", "blue square")
    model = tiny_model(config, tiny_clip_config, vocabulary=",".join(names))
    from helpers import tiny_cfg

    cfg = tiny_cfg(config, tiny_clip_config, vocabulary=",".join(names), extra=["INPUT.MIN_SIZE_TEST", 96])
    _truncate(images / "1.png")
    with caplog.at_level(logging.WARNING):
        out = region_classification_accuracy(model, dicts, build_test_mapper(cfg), names, progress=False)
    assert out["unreadable_images"] == 1
    assert out["boxes"] == sum(len(d["annotations"]) for d in dicts if not d["file_name"].endswith("1.png"))
    assert "CANNOT READ IMAGE" in caplog.text and "1.png" in caplog.text
    for p in images.iterdir():
        p.write_bytes(b"junk")
    with pytest.raises(UnreadableImagesError):
        region_classification_accuracy(model, dicts, build_test_mapper(cfg), names, progress=False,
                                       max_unreadable_fraction=1.0)
    assert np.isfinite(out["acc-all"])


def test_every_failure_of_the_test_mapper_becomes_a_placeholder(tmp_path):
    """A float image and a size matching neither the annotation nor its EXIF transpose are
    left out like a truncated file, with the reason."""
    from regionclip_d2.data.mappers import build_test_mapper
    from regionclip_d2.evaluation.unreadable import SkipUnreadableMapper

    Image.fromarray(np.full((8, 8), 0.5, np.float32), mode="F").save(tmp_path / "f.tif")
    Image.new("RGB", (8, 6)).save(tmp_path / "small.png")
    mapper = SkipUnreadableMapper(build_test_mapper(get_regionclip_cfg("configs/Base-CLIP-C4.yaml")))
    out = mapper({"file_name": str(tmp_path / "f.tif"), "image_id": 1, "height": 8, "width": 8})
    assert out[UNREADABLE].startswith("ImageReadError") and "mode F" in out[UNREADABLE] and "image" not in out
    out = mapper({"file_name": str(tmp_path / "small.png"), "image_id": 2, "height": 20, "width": 30})
    assert out[UNREADABLE].startswith("SizeMismatchError") and out["image_id"] == 2
    assert "image" in mapper({"file_name": str(tmp_path / "small.png"), "image_id": 3, "height": 6, "width": 8})
