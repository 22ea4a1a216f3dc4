"""Region classification on ground-truth boxes: the per-class means of several classifiers in
one pass, and CLIPSelf's dense-map and crop read-outs against text embeddings, by hand."""
import pytest
import torch
from helpers import make_coco

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from regionclip_d2 import get_regionclip_cfg
from regionclip_d2.data.datasets import register_coco_format
from regionclip_d2.data.mappers import build_test_mapper
from regionclip_d2.evaluation.region_classification import box_classification_accuracy, dense_region_accuracy

NAMES = ("red square", "green square", "blue square")


@pytest.fixture
def data(tmp_path):
    ann, images = make_coco(tmp_path, n_images=6, seed=3, names=NAMES, novel=("blue square",))
    name = f"region_cls_{tmp_path.name}"
    register_coco_format(name, str(ann), str(images))
    try:
        yield DatasetCatalog.get(name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _cfg(tiny_vit_config):
    return get_regionclip_cfg("configs/synthetic/CLIPSelf_world.yaml", [
        "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_vit_config, "MODEL.DEVICE", "cpu", "MODEL.CLIP.CROP_REGION_TYPE", "GT",
        "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 128])


def test_per_class_means_of_several_classifiers(data, tiny_vit_config):
    mapper = build_test_mapper(_cfg(tiny_vit_config))
    labels = [c for d in data for c in (a["category_id"] for a in d["annotations"])]
    counts = {c: labels.count(c) for c in set(labels)}
    assert len(counts) == 3  # every class has boxes in this data
    out = box_classification_accuracy(
        {"truth": lambda x: x["instances"].gt_classes,
         "always 0": lambda x: torch.zeros_like(x["instances"].gt_classes)},
        data, mapper, NAMES, novel_classes=("blue square",), progress=False)
    assert out["truth"]["acc-all"] == out["truth"]["acc-novel"] == 100.0
    assert out["truth"]["boxes"] == out["always 0"]["boxes"] == len(labels)
    zero = out["always 0"]
    assert zero["per_class"] == {"red square": 100.0, "green square": 0.0, "blue square": 0.0}
    assert zero["acc-base"] == 50.0 and zero["acc-novel"] == 0.0
    assert zero["acc-all"] == pytest.approx(100.0 / 3)  # the mean over classes, not over boxes


def test_dense_region_accuracy_by_hand(data, tiny_vit_config):
    """Each box: the student's dense map RoI-pooled (1x1 bin, adaptive sampling) and the
    teacher's crop embedding, classified by the argmax cosine with the text embeddings."""
    from detectron2.layers import ROIAlign

    cfg = _cfg(tiny_vit_config)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    text = torch.randn(3, 24)
    mapper = build_test_mapper(cfg)
    out = dense_region_accuracy(model, data, mapper, text, NAMES, ("blue square",), progress=False)
    text_n = torch.nn.functional.normalize(text, dim=-1)
    right, cosines = {"dense": {}, "crop": {}}, []
    with torch.no_grad():
        for d in data:
            x = mapper(d)
            img = model.preprocess_image([x]).tensor
            boxes = x["instances"].gt_boxes.tensor
            rois = torch.cat([torch.zeros(len(boxes), 1), boxes], dim=1)
            dense = ROIAlign((1, 1), 1 / 8, 0, aligned=True)(model.backbone(img)["dense"], rois).flatten(1)
            crops = ROIAlign((32, 32), 1.0, 0, aligned=True)(img, rois)
            crop = model.teacher_backbone.encode_image(crops)
            cosines += torch.nn.functional.cosine_similarity(dense, crop, dim=-1).tolist()
            for key, emb in (("dense", dense), ("crop", crop)):
                guess = (torch.nn.functional.normalize(emb, dim=-1) @ text_n.t()).argmax(dim=1)
                for g, t in zip(guess.tolist(), x["instances"].gt_classes.tolist()):
                    right[key].setdefault(NAMES[t], []).append(g == t)
    for key in ("dense", "crop"):
        per_class = {n: 100.0 * sum(v) / len(v) for n, v in right[key].items()}
        assert out[key]["per_class"] == pytest.approx(per_class)
        assert out[key]["acc-novel"] == pytest.approx(per_class["blue square"])
    assert out["dense"]["cosine_to_crop"] == pytest.approx(sum(cosines) / len(cosines), abs=1e-5)
    with pytest.raises(ValueError, match="2 text embeddings for 3 classes"):
        dense_region_accuracy(model, data, mapper, text[:2], NAMES, progress=False)
    with pytest.raises(ValueError, match="text embeddings have dim 16 but the ViT embeds regions in 24"):
        dense_region_accuracy(model, data, mapper, torch.randn(3, 16), NAMES, progress=False)
