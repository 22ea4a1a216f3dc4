"""The one-call API (regionclip_d2.Detector): inputs, colour order, resizing, batching, the
per-name embedding cache, image exemplars, per-class thresholds and weight loading."""
import argparse
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from helpers import tiny_cfg

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

import regionclip_d2
from regionclip_d2 import Detections, Detector, Exemplar
from regionclip_d2.api import DetectorInputError
from regionclip_d2.checkpoint import CheckpointFormatError
from regionclip_d2.modeling.meta_arch import clip_rcnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C4_RPN = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml"
C4_GT = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml"
SMALL = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 160,
         "MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST", 50]


def small_cfg(tiny_clip_config, config=C4_RPN, extra=()):
    return tiny_cfg(config, tiny_clip_config, extra=SMALL + list(extra))


@pytest.fixture
def weights(tiny_clip_config, tmp_path):
    """A whole tiny detector checkpoint (recognition and RPN branch, text encoder)."""
    torch.manual_seed(0)
    model = build_model(small_cfg(tiny_clip_config))
    DetectionCheckpointer(model, str(tmp_path)).save("tiny")
    return str(tmp_path / "tiny.pth")


def red_square(h=70, w=100, seed=0):
    """An RGB image: a pure red square on a noisy grey background."""
    rng = np.random.default_rng(seed)
    img = rng.integers(100, 140, (h, w, 3), dtype=np.uint8)
    img[10:45, 20:65] = (255, 0, 0)
    return img


def by_score(boxes, scores, classes):
    order = np.argsort(-np.asarray(scores), kind="stable")
    return np.asarray(boxes)[order], np.asarray(scores)[order], np.asarray(classes)[order]


# ----------------------------------------------------------------------------- colour, inputs, resizing
def test_rgb_inputs_match_default_predictor_on_bgr(tiny_clip_config, weights, tmp_path):
    """An RGB array, its PNG file and its PIL image give exactly what DefaultPredictor gives on
    the BGR array; a red object reaches the model as red (channel R of the RGB model input)."""
    from PIL import Image

    cfg = small_cfg(tiny_clip_config, extra=["MODEL.WEIGHTS", weights])
    det = Detector.from_config(cfg)
    predictor = DefaultPredictor(cfg)
    predictor.model.set_vocabulary(["red square", "blue square"])
    rgb = red_square()
    res = det(rgb, classes=["red square", "blue square"], threshold=0.0)
    assert isinstance(res, Detections) and len(res) > 0
    ref = predictor(rgb[:, :, ::-1].copy())["instances"]
    rb, rs, rc = by_score(ref.pred_boxes.tensor.numpy(), ref.scores.numpy(), ref.pred_classes.numpy())
    np.testing.assert_allclose(res.boxes, rb, rtol=0, atol=1e-4)
    np.testing.assert_allclose(res.scores, rs, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(res.label_ids, rc)
    assert res.labels == [["red square", "blue square"][i] for i in rc]
    assert res.boxes.dtype == np.float32 and res.boxes.shape == (len(res), 4) and res.label_ids.dtype == np.int64
    assert res.image_size == (70, 100)
    # the same array given to DefaultPredictor as if it were BGR (red seen as blue) differs: the test can tell
    wrong = predictor(rgb)["instances"]
    assert len(wrong) != len(res) or not np.allclose(np.sort(wrong.scores.numpy()), np.sort(res.scores), atol=1e-4)
    # the model input holds the red square in its R channel (the model's INPUT.FORMAT is RGB)
    inp, _ = det._model_input(rgb)
    assert det.model.input_format == "RGB"
    sy, sx = slice(int(12 * 96 / 70), int(43 * 96 / 70)), slice(int(22 * 96 / 70), int(63 * 96 / 70))
    assert (inp["image"][0, sy, sx] == 255).all() and (inp["image"][2, sy, sx] == 0).all()
    # a file and a PIL image of the same pixels: the same detections
    Image.fromarray(rgb).save(tmp_path / "red.png")
    for image in (str(tmp_path / "red.png"), tmp_path / "red.png", Image.fromarray(rgb)):
        other = det(image, classes=["red square", "blue square"], threshold=0.0)
        np.testing.assert_array_equal(other.boxes, res.boxes)
        np.testing.assert_array_equal(other.scores, res.scores)


def test_boxes_are_in_original_pixels_and_instances_on_request(tiny_clip_config):
    """GT mode (boxes kept as given, NO_BOX_DELTA): a box given in original pixels of an image the
    detector upscales 2x comes back as the same box; the Instances match the arrays."""
    det = Detector.from_config(small_cfg(tiny_clip_config, C4_GT, ["INPUT.MIN_SIZE_TEST", 120]),
                               allow_random_weights=True)
    img = red_square(60, 80)
    box = [20.0, 10.0, 65.0, 45.0]
    res = det(img, classes=["a", "b"], boxes=[box], threshold=0.0, return_instances=True)
    assert len(res) >= 1
    np.testing.assert_allclose(res.boxes, np.tile(box, (len(res), 1)), atol=1e-4)
    inst = res.instances
    assert inst.image_size == (60, 80)
    np.testing.assert_array_equal(inst.pred_boxes.tensor.numpy(), res.boxes)
    np.testing.assert_array_equal(inst.scores.numpy(), res.scores)
    assert det(img, classes=["a", "b"], boxes=[box]).instances is None
    d = res.to_dict()
    assert d["height"] == 60 and d["detections"][0]["class_name"] in ("a", "b")
    json.dumps(d)


def test_batches_run_one_forward_each(tiny_clip_config):
    """``batch_size`` images per forward; batched and one-by-one give the same detections (GT
    boxes, so that the comparison does not hang on the order of near-equal RPN proposals)."""
    det = Detector.from_config(small_cfg(tiny_clip_config, C4_GT), allow_random_weights=True)
    batches = []
    det.model.register_forward_pre_hook(lambda m, args: batches.append(len(args[0])))
    images = [red_square(seed=i) for i in range(5)]
    boxes = [[[20, 10, 65, 45], [70, 40, 98, 68]]] * 5
    res = det(images, classes=["a", "b"], threshold=0.0, batch_size=2, boxes=boxes)
    assert batches == [2, 2, 1]
    assert isinstance(res, list) and len(res) == 5
    batches.clear()
    single = [det(im, classes=["a", "b"], threshold=0.0, boxes=b) for im, b in zip(images, boxes)]
    assert batches == [1] * 5

    def table(r):
        return {(tuple(np.round(b, 2)), lab): s for b, lab, s in zip(r.boxes, r.labels, r.scores)}

    for r, s in zip(res, single):
        assert len(r) == 4 and table(r).keys() == table(s).keys()
        for k, v in table(r).items():
            assert v == pytest.approx(table(s)[k], abs=1e-4)
    assert len({tuple(r.scores) for r in res}) == 5  # five different images, five different answers
    # RPN regions: images of different sizes in one batch; a list of one image gives a list
    rpn = Detector.from_config(small_cfg(tiny_clip_config), allow_random_weights=True)
    mixed = rpn([red_square(50, 90), red_square(80, 60)], classes=["a"], threshold=0.0, batch_size=4)
    assert [m.image_size for m in mixed] == [(50, 90), (80, 60)]
    for m in mixed:
        h, w = m.image_size
        assert len(m) > 0 and (m.boxes[:, 2] <= w + 1e-3).all() and (m.boxes[:, 3] <= h + 1e-3).all()
    assert isinstance(rpn([red_square()], classes=["a"]), list)


# ----------------------------------------------------------------------------- vocabulary and its cache
def test_text_embeddings_cached_per_name(tiny_clip_config, monkeypatch):
    calls = []
    real = clip_rcnn.embed_class_names

    def counting(names, *a, **k):
        calls.append(list(names))
        return real(names, *a, **k)

    monkeypatch.setattr(clip_rcnn, "embed_class_names", counting)
    det = Detector.from_config(small_cfg(tiny_clip_config), allow_random_weights=True)
    img = red_square()
    det(img, classes=["a", "b"])
    assert calls == [["a", "b"]]  # the configured vocabulary (cat, dog, ring) was not embedded
    det(img, classes=["b", "c"])
    assert calls[1:] == [["c"]]
    det(img, classes=["c", "a", "b"])
    assert len(calls) == 2
    emb, names = det.vocabulary(["c", "a", "b"])
    assert names == ["c", "a", "b"] and len(calls) == 2
    torch.testing.assert_close(emb, real(["c", "a", "b"], det.model.lang_encoder, templates="single"))
    # classes=None: the configured vocabulary, embedded once
    res = det(img, threshold=0.0)
    assert calls[2:] == [["cat", "dog", "ring"]] and set(res.labels) <= {"cat", "dog", "ring"}
    assert det.default_classes == ["cat", "dog", "ring"]
    # new text-encoder weights: names are embedded again, to other embeddings
    with torch.no_grad():
        det.model.lang_encoder.text_projection.add_(torch.randn_like(det.model.lang_encoder.text_projection))
    det(img, classes=["a"])
    assert calls[3:] == [["a"]]
    assert not torch.allclose(det.vocabulary(["a"])[0][0], emb[1])
    assert len(calls) == 4


def test_exemplar_embedding_is_the_mean_of_encode_boxes(tiny_clip_config):
    """By hand: each exemplar image resized as DefaultPredictor resizes, its boxes scaled with it,
    encode_boxes, the L2-normalised region embeddings averaged and normalised again."""
    det = Detector.from_config(small_cfg(tiny_clip_config, C4_GT), allow_random_weights=True)
    model = det.model
    a, b = red_square(60, 80, seed=1), red_square(120, 90, seed=2)
    boxes_a, boxes_b = [[20, 10, 65, 45], [0, 0, 40, 30]], [[5, 50, 80, 110]]
    regions = []
    for img, boxes in ((a, boxes_a), (b, boxes_b)):
        tfm = T.ResizeShortestEdge([96, 96], 160).get_transform(img)
        inp = {"image": torch.as_tensor(tfm.apply_image(img).astype("float32").transpose(2, 0, 1)),
               "height": img.shape[0], "width": img.shape[1]}
        regions.append(model.encode_boxes([inp], [torch.as_tensor(tfm.apply_box(np.array(boxes, np.float32)))])[0])
    regions = torch.cat(regions)
    assert regions.shape == (3, 64)
    expected = torch.nn.functional.normalize(regions.mean(0), dim=0)
    ex = Exemplar("mug", image=[a, b], boxes=[boxes_a, boxes_b])
    got = det.exemplar_embedding(ex)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, regions[0], atol=1e-3)  # three different regions were averaged
    # one image: boxes as a plain list; one box may be given flat
    one = det.exemplar_embedding(Exemplar("mug", a, [20, 10, 65, 45]))
    torch.testing.assert_close(one, regions[0], atol=1e-6, rtol=1e-5)
    # cached: no region encoding the second time, until the recognition weights change
    n = []
    real = model.encode_boxes
    model.encode_boxes = lambda *args, **kw: (n.append(1), real(*args, **kw))[1]
    det.exemplar_embedding(ex)
    assert n == []
    with torch.no_grad():
        model.backbone.conv1.weight.add_(torch.randn_like(model.backbone.conv1.weight))
    changed = det.exemplar_embedding(ex)
    assert len(n) == 2 and not torch.allclose(changed, got)


def test_exemplar_of_a_gt_box_labels_that_box(tiny_clip_config):
    """GT-box mode: an exemplar made of a box classifies that same box as its class (cosine 1
    with itself); names and exemplars mix, labels follow the list's order."""
    det = Detector.from_config(small_cfg(tiny_clip_config, C4_GT), allow_random_weights=True)
    img = red_square(70, 100)
    mug_box, other_box = [20.0, 10.0, 65.0, 45.0], [70.0, 40.0, 98.0, 68.0]
    classes = ["cat", Exemplar("mug", img, [mug_box]), "dog"]
    emb, names = det.vocabulary(classes)
    assert names == ["cat", "mug", "dog"]
    torch.testing.assert_close(emb[0], det.text_embeddings(["cat"])[0])
    torch.testing.assert_close(emb[2], det.text_embeddings(["dog"])[0])
    inp, tfm = det._model_input(img)
    region = det.model.encode_boxes([inp], [torch.as_tensor(tfm.apply_box(np.array([mug_box], np.float32)))])[0][0]
    assert float(region @ emb[1]) == pytest.approx(1.0, abs=1e-5)
    res = det(img, classes=classes, boxes=[mug_box, other_box], threshold=0.0)
    on_mug = np.abs(res.boxes - np.array(mug_box)).max(axis=1) < 1e-3
    assert on_mug.any()
    best = int(np.argmax(np.where(on_mug, res.scores, -1)))
    assert res.labels[best] == "mug" and res.label_ids[best] == 1 and res.scores[best] > 0.9
    assert det.model.class_names == ["cat", "mug", "dog"]
    # another order: the exemplar first
    res2 = det(img, classes=[Exemplar("mug", img, [mug_box]), "cat"], boxes=[mug_box], threshold=0.0)
    assert res2.labels[0] == "mug" and res2.label_ids[0] == 0
    # exemplar only (no text needed)
    res3 = det(img, classes=[Exemplar("mug", img, [mug_box])], boxes=[mug_box], threshold=0.5)
    assert res3.labels == ["mug"]


def test_mixing_names_and_uncalibrated_exemplars_warns_once(tiny_clip_config, caplog):
    det = Detector.from_config(small_cfg(tiny_clip_config, C4_GT), allow_random_weights=True)
    img = red_square(70, 100)
    mug = Exemplar("mug", img, [[20, 10, 65, 45]])
    with caplog.at_level("WARNING", logger="regionclip_d2"):
        det(img, classes=[mug], boxes=[[20, 10, 65, 45]])  # exemplars only: nothing to say
        assert "without calibration" not in caplog.text
        det(img, classes=["cat", mug], boxes=[[20, 10, 65, 45]])
        det(img, classes=["dog", mug], boxes=[[20, 10, 65, 45]])
    assert caplog.text.count("without calibration") == 1 and "calibrate_exemplars" in caplog.text


def test_exemplar_calibration_by_hand(tiny_clip_config):
    """calibrate_exemplars: (a, b) send the references' mean leave-one-out exemplar cosine of
    positives and of negatives (other references' boxes, a grid and the whole image) to the
    mean text cosines of the same regions; afterwards exemplar classes score (a cos + b) / T
    and name classes are unchanged."""
    det = Detector.from_config(small_cfg(tiny_clip_config, C4_GT), allow_random_weights=True)
    a_img, b_img = red_square(70, 100, seed=1), red_square(80, 90, seed=2)
    ref_a = Exemplar("cat", image=a_img, boxes=[[20, 10, 65, 45], [0, 0, 50, 40], [30, 20, 90, 60]])
    ref_b = Exemplar("dog", image=b_img, boxes=[[5, 5, 60, 70], [40, 30, 85, 75]])
    stats = det.calibrate_exemplars([ref_a, ref_b], grid=2)
    # by hand
    regions = {"cat": det.region_embeddings(a_img, ref_a.boxes).double(),
               "dog": det.region_embeddings(b_img, ref_b.boxes).double()}

    def grid(img):
        h, w = img.shape[:2]
        return [[0, 0, w / 2, h / 2], [0, h / 2, w / 2, h], [w / 2, 0, w, h / 2], [w / 2, h / 2, w, h], [0, 0, w, h]]

    background = torch.cat([det.region_embeddings(a_img, grid(a_img)),
                            det.region_embeddings(b_img, grid(b_img))]).double()
    text = det.text_embeddings(["cat", "dog"]).double()
    rows = []
    for k, (name, other) in enumerate((("cat", "dog"), ("dog", "cat"))):
        r = regions[name]
        loo = [torch.nn.functional.normalize(torch.cat([r[:i], r[i + 1:]]).mean(0), dim=0) for i in range(len(r))]
        pos_e = sum(float(r[i] @ loo[i]) for i in range(len(r))) / len(r)
        e = torch.nn.functional.normalize(r.mean(0), dim=0)
        neg = torch.cat([background, regions[other]])
        rows.append([pos_e, float((neg @ e).mean()), float((r @ text[k]).mean()), float((neg @ text[k]).mean())])
    pe, ne, pt, nt = np.mean(rows, axis=0)
    a = (pt - nt) / (pe - ne)
    assert stats["scale"] == pytest.approx(a, rel=1e-6)
    assert stats["bias"] == pytest.approx(pt - a * pe, rel=1e-6, abs=1e-9)
    assert det.exemplar_calibration == (stats["scale"], stats["bias"])
    # a call mixing names and an exemplar: scores by hand
    mug = Exemplar("mug", a_img, [[20, 10, 65, 45]])
    classes = ["cat", mug, "dog"]
    box = [30.0, 20.0, 90.0, 60.0]
    res = det(a_img, classes=classes, boxes=[box], threshold=0.0)
    x = det.region_embeddings(a_img, [box])[0]
    emb, _ = det.vocabulary(classes)
    cos = emb @ x
    logits = torch.cat([torch.stack([cos[0], stats["scale"] * cos[1] + stats["bias"], cos[2]]), torch.zeros(1)])
    probs = torch.softmax(logits / 0.01, dim=0)[:3]
    for label_id, score in zip(res.label_ids, res.scores):
        assert score == pytest.approx(float(probs[label_id]), abs=1e-5)
    assert det.logit_affine(["cat", "dog"]) is None  # names only: no affine
    det.exemplar_calibration = None
    raw = det(a_img, classes=classes, boxes=[box], threshold=0.0)
    assert not np.allclose(sorted(raw.scores), sorted(res.scores), atol=1e-4)
    # bad references
    with pytest.raises(DetectorInputError, match="fewer than 2 boxes"):
        det.calibrate_exemplars([Exemplar("cat", a_img, [[20, 10, 65, 45]])])
    with pytest.raises(DetectorInputError, match="list of Exemplar"):
        det.calibrate_exemplars(["cat"])
    with pytest.raises(ValueError, match="logit_affine must be a finite"):
        det.model.set_vocabulary(emb, ["cat", "mug", "dog"], logit_affine=torch.ones(2, 2))
    with pytest.raises(ValueError, match="needs a \\[C, D\\] tensor vocabulary"):
        det.model.set_vocabulary(["cat", "dog"], logit_affine=torch.ones(2, 2))


# ----------------------------------------------------------------------------- thresholds
def test_per_class_thresholds(tiny_clip_config):
    det = Detector.from_config(small_cfg(tiny_clip_config), allow_random_weights=True)
    img = red_square()
    classes = ["a", "b", "c"]
    everything = det(img, classes=classes, threshold=0.0)
    assert set(everything.labels) == {"a", "b", "c"}
    thr = {"a": 2.0, "b": float(np.median(everything.scores))}
    res = det(img, classes=classes, threshold=thr, default_threshold=0.0)
    want = [(lab, s) for lab, s in zip(everything.labels, everything.scores)
            if s >= np.float32(thr.get(lab, 0.0))]
    assert list(zip(res.labels, res.scores)) == want
    assert "a" not in res.labels and "c" in res.labels
    # the default applies to the classes the mapping leaves out
    res = det(img, classes=classes, threshold={"a": 0.0}, default_threshold=2.0)
    assert set(res.labels) == {"a"}
    with pytest.raises(ValueError, match=r"not in the vocabulary: \['d'\]"):
        det(img, classes=classes, threshold={"d": 0.5})
    with pytest.raises(ValueError, match="finite number"):
        det(img, classes=classes, threshold=float("nan"))


# ----------------------------------------------------------------------------- errors and weights
def test_bad_inputs_are_clear_errors(tiny_clip_config, tmp_path):
    det = Detector.from_config(small_cfg(tiny_clip_config), allow_random_weights=True)
    img = red_square()
    (tmp_path / "text.jpg").write_text("not an image")
    cases = [
        (str(tmp_path / "missing.jpg"), "does not exist"),
        (str(tmp_path / "text.jpg"), "not a readable image"),
        (img[:, :, 0], r"grayscale\); give H x W x 3 RGB, e\.g\. np\.repeat"),
        (img.astype(np.float32) / 255, r"dtype float32; give uint8"),
        (np.concatenate([img, img[:, :, :1]], axis=2), r"drop alpha"),
        (img.transpose(2, 0, 1).copy(), r"channels first\? use a\.transpose"),
        (np.stack([img, img]), "pass a list of arrays"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), r"permute\(1, 2, 0\)"),
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (42, "give a path, a PIL image"),
    ]
    for bad, msg in cases:
        with pytest.raises(DetectorInputError, match=msg):
            det(bad, classes=["a"])
    with pytest.raises(DetectorInputError, match="image 1: .*does not exist"):
        det([img, str(tmp_path / "missing.jpg")], classes=["a"])
    with pytest.raises(DetectorInputError, match="classes is empty"):
        det(img, classes=[])
    with pytest.raises(ValueError, match=r"duplicate class names \['cat'\]"):
        det(img, classes=["cat", "dog", "cat"])
    with pytest.raises(ValueError, match=r"duplicate class names \['cat'\]"):
        det(img, classes=["cat", Exemplar("cat", img, [[0, 0, 10, 10]])])
    with pytest.raises(DetectorInputError, match="a name .* or an Exemplar"):
        det(img, classes=["cat", 3])
    with pytest.raises(DetectorInputError, match="batch_size"):
        det(img, classes=["a"], batch_size=0)
    with pytest.raises(DetectorInputError, match="CROP_REGION_TYPE is GT or PROPOSALS"):
        det(img, classes=["a"], boxes=[[0, 0, 10, 10]])
    with pytest.raises(DetectorInputError, match="XYXY, not XYWH"):
        det(img, classes=[Exemplar("mug", img, [[30, 10, 20, 40]])])
    with pytest.raises(DetectorInputError, match="lies outside"):
        det(img, classes=[Exemplar("mug", img, [[200, 10, 220, 40]])])
    with pytest.raises(DetectorInputError, match="one box list per image|2 box lists"):
        det(img, classes=[Exemplar("mug", [img, img], [[0, 0, 10, 10]])])
    gt = Detector.from_config(small_cfg(tiny_clip_config, C4_GT), allow_random_weights=True)
    with pytest.raises(DetectorInputError, match=r"pass boxes=\[\[x0, y0, x1, y1\], \.\.\.\] per image"):
        gt(img, classes=["a"])
    with pytest.raises(DetectorInputError, match="2 box lists for 1 images"):
        gt([img], classes=["a"], boxes=[[[0, 0, 5, 5]], [[0, 0, 5, 5]]])
    if not torch.cuda.is_available():
        with pytest.raises(DetectorInputError, match="CUDA is not available"):
            Detector.from_config(small_cfg(tiny_clip_config), device="cuda", allow_random_weights=True)


def test_weights_loading_and_its_safety_checks(tiny_clip_config, weights, tmp_path):
    # no weights: an error naming the fixes
    with pytest.raises(DetectorInputError, match="weights=.*rpn_weights=.*allow_random_weights=True"):
        Detector.from_config(small_cfg(tiny_clip_config))
    # a config path, opts and weights= build the same detector as DefaultPredictor loads
    opts = ["MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config, "MODEL.CLIP.TEXT_EMB_DIM", 64,
            "MODEL.CLIP.PROMPT_TEMPLATES", "single", "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 4,
            "MODEL.CLIP.VOCABULARY", "coco_ovd_novel", "MODEL.ROI_HEADS.NUM_CLASSES", 17] + SMALL
    det = Detector.from_config(C4_RPN, weights=weights, device="auto", opts=opts)
    assert str(det.device) == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert det.default_classes[:2] == ["airplane", "bus"] and len(det.default_classes) == 17
    saved = torch.load(weights, weights_only=True)["model"]
    got = det.model.state_dict()
    for k, v in saved.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    # a file holding Python objects beyond tensors is refused unless trusted, with the fix named
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": saved, "args": argparse.Namespace(lr=0.1)}, unsafe)
    with pytest.raises(CheckpointFormatError, match="TRUST_CHECKPOINTS True"):
        Detector.from_config(C4_RPN, weights=str(unsafe), opts=opts)
    trusted = Detector.from_config(C4_RPN, weights=str(unsafe), opts=opts, trust_checkpoints=True)
    torch.testing.assert_close(trusted.model.state_dict()["backbone.conv1.weight"], saved["backbone.conv1.weight"])
    pkl = tmp_path / "model.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in saved.items()}}, f)
    with pytest.raises(CheckpointFormatError, match="pickle file.*TRUST_CHECKPOINTS True"):
        Detector.from_config(C4_RPN, weights=str(pkl), opts=opts)
    # DefaultPredictor keeps working on the same config
    cfg = regionclip_d2.get_regionclip_cfg(C4_RPN, opts + ["MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu"])
    predictor = DefaultPredictor(cfg)
    assert len(predictor(red_square()[:, :, ::-1].copy())["instances"]) > 0
    assert regionclip_d2.Detector is Detector


def test_demo_per_class_thresholds(tiny_clip_config, tmp_path):
    """tools/demo.py --class-thresholds (run in-process: tests/tools/test_tools.py runs the demo as a
    subprocess)."""
    from PIL import Image

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from demo import main

    Image.fromarray(red_square()).save(tmp_path / "a.png")
    (tmp_path / "thr.json").write_text(json.dumps({"red star": 2.0, "blue ring": 2.0}))
    opts = ["--opts", "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config, "MODEL.CLIP.TEXT_EMB_DIM", "64",
            "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "4", "MODEL.CLIP.PROMPT_TEMPLATES", "single",
            "INPUT.MIN_SIZE_TEST", "96", "MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST", "50", "MODEL.DEVICE", "cpu"]
    base = ["--input", str(tmp_path / "a.png"), "--vocabulary", "custom", "--custom-vocabulary",
            "red star,blue ring,moon", "--random-weights", "--confidence-threshold", "0", "--cpu"]

    def found(out):
        return {d["class_name"] for d in json.loads((tmp_path / out / "a_png.json").read_text())["detections"]}

    assert main(base + ["--output", str(tmp_path / "all")] + opts) == 0
    assert found("all") == {"red star", "blue ring", "moon"}
    assert main(base + ["--output", str(tmp_path / "out"), "--class-thresholds", str(tmp_path / "thr.json")]
                + opts) == 0
    assert found("out") == {"moon"}
    # a name the vocabulary does not have, or a file that is not an object: one line, before any model work
    (tmp_path / "bad.json").write_text(json.dumps({"red sttar": 0.5}))
    with pytest.raises(SystemExit, match=r"not in the vocabulary: \['red sttar'\]"):
        main(base + ["--output", str(tmp_path / "o"), "--class-thresholds", str(tmp_path / "bad.json")])
    (tmp_path / "list.json").write_text("[0.5]")
    with pytest.raises(SystemExit, match="must hold one JSON object"):
        main(base + ["--output", str(tmp_path / "o"), "--class-thresholds", str(tmp_path / "list.json")])
    assert not (tmp_path / "o").exists()


def test_demo_grounds_a_caption(tiny_clip_config, tmp_path):
    """tools/demo.py --caption on a grounding detector: the caption's phrases are the classes, the
    JSON names each detection's phrase and span; without the grounding head, or with a caption
    that has no noun phrase, a one-line error."""
    from PIL import Image

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from demo import main

    Image.fromarray(red_square()).save(tmp_path / "a.png")
    opts = ["--opts", "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config, "MODEL.CLIP.TEXT_EMB_DIM", "64",
            "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "4", "MODEL.CLIP.PROMPT_TEMPLATES", "single",
            "INPUT.MIN_SIZE_TEST", "96", "MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST", "50", "MODEL.DEVICE", "cpu"]
    base = ["--input", str(tmp_path / "a.png"), "--random-weights", "--confidence-threshold", "0", "--cpu"]
    caption = "a red square beside the blue ring"
    assert main(base + ["--output", str(tmp_path / "g"), "--caption", caption]
                + opts + ["MODEL.GROUNDING.ENABLED", "True", "MODEL.GROUNDING.ALIGN_DIM", "32"]) == 0
    out = json.loads((tmp_path / "g" / "a_png.json").read_text())
    assert out["caption"] == caption
    assert [p["phrase"] for p in out["phrases"]] == ["red square", "blue ring"]
    assert out["detections"] and {d["phrase"] for d in out["detections"]} <= {"red square", "blue ring"}
    for d in out["detections"]:
        a, b = d["span"]
        assert caption[a:b] == d["phrase"] == d["class_name"]
    with pytest.raises(SystemExit, match="needs a grounding detector"):
        main(base + ["--output", str(tmp_path / "o"), "--caption", caption] + opts)
    with pytest.raises(SystemExit, match="no noun phrase"):
        main(base + ["--output", str(tmp_path / "o"), "--caption", "and then quickly"]
             + opts + ["MODEL.GROUNDING.ENABLED", "True", "MODEL.GROUNDING.ALIGN_DIM", "32"])
