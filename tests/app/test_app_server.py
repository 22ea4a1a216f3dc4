"""The web app's server (regionclip_d2.app) through FastAPI's TestClient, on the tiny detector:
the page and its random-weights banner, good requests (sample, upload, exemplar) against the
Detector called directly, and every bad input: a message, a sensible status, and the server
answering the next request."""
import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from helpers import tiny_cfg
from PIL import Image
from tiny_app import C4_RPN, SMALL, VOCAB, data_url, one_torch_thread, png_bytes, red_square, tiny_detector

from detectron2.checkpoint import DetectionCheckpointer

from regionclip_d2 import Detector, Exemplar
from regionclip_d2.api import DetectorInputError
from regionclip_d2.app import MAX_CLASSES, create_app, server

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # FastAPI's TestClient needs it
from fastapi.testclient import TestClient  # noqa: E402

GOOD = {"sample": "red.png", "vocabulary": ", ".join(VOCAB), "threshold": 0.0}


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    with one_torch_thread():
        yield tiny_detector(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples")
    (folder / "red.png").write_bytes(png_bytes(red_square()))
    (folder / "world").mkdir()
    (folder / "world" / "other.png").write_bytes(png_bytes(red_square(64, 64, seed=1)))
    return {"red.png": str(folder / "red.png"), "world/other.png": str(folder / "world" / "other.png")}


@pytest.fixture(scope="module")
def client(det, samples):
    return TestClient(create_app(lambda: det, samples=samples, default_vocabulary="red square, blue square",
                                 default_threshold=0.0))


def detect(client, **changes):
    payload = dict(GOOD)
    payload.update(changes)
    return client.post("/api/detect", json={k: v for k, v in payload.items() if v is not None})


def table(d):
    return [x["label"] for x in d["detections"]], np.array([x["score"] for x in d["detections"]]), \
        np.array([x["box"] for x in d["detections"]]).reshape(-1, 4)


def assert_same_as_detector(d, ref):
    labels, scores, boxes = table(d)
    assert labels == ref.labels
    np.testing.assert_allclose(scores, ref.scores, rtol=0, atol=1e-4)
    np.testing.assert_allclose(boxes, ref.boxes, rtol=0, atol=0.051)


# ----------------------------------------------------------------------------- the page
def test_page_has_the_form_the_samples_and_the_random_weights_banner(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert 'id="random-banner"' in page and "RANDOM WEIGHTS (recognition and RPN branch)" in page
    for element in ("image-file", "sample", "vocabulary", "threshold", "exemplar-name", "exemplar-box", "detect",
                    "message", "detections", "result-image"):
        assert f'id="{element}"' in page
    assert "{{" not in page.split("<script id=\"app-state\"")[1]  # every field filled in
    info = client.get("/api/info").json()
    assert info["samples"] == ["red.png", "world/other.png"]
    assert info["model"]["random_weights"] == "recognition and RPN branch"
    assert info["limits"]["max_classes"] == MAX_CLASSES
    assert info["defaults"] == {"vocabulary": "red square, blue square", "threshold": 0.0, "sample": "red.png"}


def test_samples_are_served_and_unknown_ones_named(client, samples):
    r = client.get("/api/samples/world/other.png")
    assert r.status_code == 200 and r.content == open(samples["world/other.png"], "rb").read()
    r = client.get("/api/samples/../../etc/passwd")
    assert r.status_code == 404
    r = client.get("/api/samples/nope.png")
    assert r.status_code == 404 and "no sample named 'nope.png'" in r.json()["error"]


def test_no_banner_with_real_weights(det, samples, tmp_path):
    DetectionCheckpointer(det.model, str(tmp_path)).save("tiny")
    with one_torch_thread():
        loaded = tiny_detector(tmp_path, weights=str(tmp_path / "tiny.pth"))
    assert loaded.random_weights == ""
    c = TestClient(create_app(lambda: loaded, samples=samples))
    assert "RANDOM WEIGHTS" not in c.get("/").text and 'id="random-banner"' not in c.get("/").text
    d = detect(c).json()
    assert d["random_weights"] == "" and len(d["detections"]) > 0


# ----------------------------------------------------------------------------- good requests
def test_sample_request_gives_the_detectors_detections_and_a_picture(client, det):
    with one_torch_thread():
        r = detect(client)
        ref = det(red_square(), classes=VOCAB, threshold=0.0)
    assert r.status_code == 200, r.text
    d = r.json()
    assert len(ref) > 0
    assert_same_as_detector(d, ref)
    assert (d["width"], d["height"], d["classes"], d["threshold"]) == (100, 70, 2, 0.0)
    assert d["random_weights"] == "recognition and RPN branch" and d["notes"] == []
    labels, scores, boxes = table(d)
    assert set(labels) <= set(VOCAB) and (np.diff(scores) <= 0).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 100).all() and (boxes[:, 3] <= 70).all()
    header, b64 = d["image"].split(",", 1)
    assert header == "data:image/jpeg;base64"
    picture = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert picture.format == "JPEG" and picture.size == (512, 358)  # a small image is drawn 5.12x larger


def test_upload_equals_sample_and_threshold_filters(client):
    with one_torch_thread():
        by_sample = detect(client).json()
        by_upload = detect(client, sample=None, image=data_url(png_bytes(red_square()))).json()
        assert table(by_upload)[0] == table(by_sample)[0]
        np.testing.assert_array_equal(table(by_upload)[1], table(by_sample)[1])
        scores = table(by_sample)[1]
        t = float(np.round(np.median(scores), 4))
        above = detect(client, threshold=t).json()
    kept = table(above)[1]
    assert (kept >= t - 1e-4).all() and len(kept) == int((scores >= t).sum()) and len(kept) < len(scores)
    assert above["threshold"] == t


def test_exemplar_box_is_a_class(client, det):
    box = [20, 10, 65, 45]
    with one_torch_thread():
        r = detect(client, vocabulary="blue square", exemplar={"name": "my red thing", "box": "20, 10, 65, 45"})
        img = red_square()
        ref = det(img, classes=["blue square", Exemplar("my red thing", img, [box])], threshold=0.0)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["classes"] == 2
    assert_same_as_detector(d, ref)
    # an exemplar alone is a vocabulary too; an exemplar box beyond the image is clipped to it
    with one_torch_thread():
        r = detect(client, vocabulary="", exemplar={"name": "my red thing", "box": [20, 10, 650, 45]})
    assert r.status_code == 200 and r.json()["classes"] == 1
    assert {x["label"] for x in r.json()["detections"]} <= {"my red thing"}


def test_repeated_and_blank_names_are_cleaned_with_a_note(client):
    r = detect(client, vocabulary=" red square,, blue  square ,\nred square, ")
    assert r.status_code == 200
    d = r.json()
    assert d["classes"] == 2 and d["notes"] == ["'red square' is given more than once; it is used once"]


# ----------------------------------------------------------------------------- bad input
def _huge_png():
    buf = io.BytesIO()
    Image.new("RGB", (8000, 4000), (90, 90, 90)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


BAD = {
    "non-image upload": (dict(sample=None, image=data_url(b"%PDF-1.4 this is not a picture", "application/pdf")),
                         400, "is not an image this server can read"),
    "empty upload": (dict(sample=None, image="data:image/png;base64,"), 400, "the uploaded file is empty (0 bytes)"),
    "truncated png": (dict(sample=None, image=data_url(png_bytes(red_square())[:300])), 400, "could not be decoded"),
    "not base64": (dict(sample=None, image="data:image/png;base64,@@@not base64@@@"), 400, "not valid base64"),
    "no image": (dict(sample=None), 400, "no image: upload an image file or pick a sample"),
    "unknown sample": (dict(sample="cat.png"), 400, "no sample named 'cat.png'"),
    "tiny image": (dict(sample=None, image=data_url(png_bytes(red_square(4, 5)))), 400, "too small"),
    "empty vocabulary": (dict(vocabulary=""), 400, "the vocabulary is empty"),
    "blank vocabulary": (dict(vocabulary=" , ,\n "), 400, "the vocabulary is empty"),
    "vocabulary not text": (dict(vocabulary=["cat"]), 400, "vocabulary must be text"),
    "2000 names": (dict(vocabulary=", ".join(f"thing {i}" for i in range(2000))), 400,
                   f"2000 class names; the limit is {MAX_CLASSES} per request"),
    "long name": (dict(vocabulary="x" * 500), 400, "has 500 characters; the limit is 200"),
    "threshold above 1": (dict(threshold=1.5), 400, "threshold must be a number from 0 to 1"),
    "threshold not a number": (dict(threshold="high"), 400, "threshold must be a number from 0 to 1"),
    "box of three numbers": (dict(exemplar={"name": "thing", "box": "1,2,3"}), 400, "is not four finite numbers"),
    "box not numbers": (dict(exemplar={"name": "thing", "box": "a,b,c,d"}), 400, "is not four numbers"),
    "box inverted": (dict(exemplar={"name": "thing", "box": "50,40,10,10"}), 400, "has x1 <= x0 or y1 <= y0"),
    "box outside": (dict(exemplar={"name": "thing", "box": "200,100,300,150"}), 400,
                    "lies outside the 100 x 70 image"),
    "box without name": (dict(exemplar={"name": " ", "box": "1,2,30,40"}), 400, "the exemplar box needs a name"),
    "name without box": (dict(exemplar={"name": "thing", "box": ""}), 400, "needs a box x0,y0,x1,y1"),
    "exemplar named like a class": (dict(exemplar={"name": "red square", "box": "1,2,30,40"}), 400,
                                    "is also in the vocabulary"),
    "exemplar not an object": (dict(exemplar="1,2,3,4"), 400, "exemplar must be an object"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_message_and_the_server_keeps_serving(client, case):
    changes, status, message = BAD[case]
    r = detect(client, **changes)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error and "Traceback" not in error
    assert detect(client).status_code == 200


def test_huge_image_is_refused_by_its_header(client):
    r = detect(client, sample=None, image=data_url(_huge_png()))
    assert r.status_code == 413
    assert "8000 x 4000 pixels (32.0 megapixels), above this server's limit of 30 megapixels: downscale it" \
        in r.json()["error"]
    # a decompression bomb (a header claiming far more pixels than PIL allows) too, before decoding
    bomb = png_bytes(red_square(8, 8))
    ihdr = bomb.index(b"IHDR")
    fields = struct.pack(">II", 100_000, 100_000) + bomb[ihdr + 12:ihdr + 17]
    bomb = bomb[:ihdr + 4] + fields + struct.pack(">I", zlib.crc32(b"IHDR" + fields)) + bomb[ihdr + 21:]
    r = detect(client, sample=None, image=data_url(bomb))
    assert r.status_code == 413 and "far above this server's limit" in r.json()["error"]
    assert detect(client).status_code == 200


def test_oversized_uploads_and_bodies_are_refused(client, monkeypatch):
    monkeypatch.setattr(server, "MAX_UPLOAD_BYTES", 1000)
    r = detect(client, sample=None, image=data_url(bytes(2000)))
    assert r.status_code == 413 and "above this server's limit of 0 MB" in r.json()["error"]
    monkeypatch.setattr(server, "_MAX_BODY", 500)
    r = detect(client, vocabulary="a" * 600)
    assert r.status_code == 413 and "the request is larger than this server's limit" in r.json()["error"]
    monkeypatch.undo()
    assert detect(client).status_code == 200


def test_not_json_and_not_an_object(client):
    r = client.post("/api/detect", content=b"vocabulary=cat", headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = client.post("/api/detect", json=["cat"])
    assert r.status_code == 400 and "must be a JSON object" in r.json()["error"]
    assert detect(client).status_code == 200


def test_as_many_names_as_the_limit_are_embedded(client):
    names = ", ".join(f"shape {i}" for i in range(MAX_CLASSES))
    with one_torch_thread():
        r = detect(client, vocabulary=names)
    assert r.status_code == 200 and r.json()["classes"] == MAX_CLASSES


# ----------------------------------------------------------------------------- failures of the model
class _Failing:
    """The tiny detector, failing on the class name "explode" as a broken model would."""

    def __init__(self, det):
        self.det, self.cfg, self.random_weights = det, det.cfg, det.random_weights

    def __call__(self, image, classes, threshold):
        if "explode" in classes:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        if "refuse" in classes:
            raise DetectorInputError("classes: 'refuse' is refused (a message of the Detector)")
        return self.det(image, classes=classes, threshold=threshold)


def test_model_errors_become_messages(det, samples):
    c = TestClient(create_app(lambda: _Failing(det), samples=samples))
    r = detect(c, vocabulary="explode")
    assert r.status_code == 500
    error = r.json()["error"]
    assert "RuntimeError: mat1 and mat2 shapes cannot be multiplied" in error and "keeps running" in error
    assert "Traceback" not in error and "File \"" not in error
    r = detect(c, vocabulary="refuse")
    assert r.status_code == 400 and r.json()["error"] == "classes: 'refuse' is refused (a message of the Detector)"
    assert detect(c).status_code == 200


def test_a_model_that_cannot_load_is_reported(samples):
    calls = []

    def factory():
        calls.append(1)
        raise FileNotFoundError("weights file 'missing.pth' does not exist")

    c = TestClient(create_app(factory, samples=samples))
    page = c.get("/")
    assert page.status_code == 200 and 'id="model-error"' in page.text and "missing.pth" in page.text
    r = detect(c)
    assert r.status_code == 503
    assert "the model could not be loaded (FileNotFoundError: weights file 'missing.pth' does not exist)" \
        in r.json()["error"]
    assert len(calls) == 1  # built once: the failure is remembered, not retried on every request


def test_create_app_checks_its_defaults(det, samples):
    with pytest.raises(ValueError, match="default_sample 'x.png' is not one of the samples"):
        create_app(lambda: det, samples=samples, default_sample="x.png")
    with pytest.raises(ValueError, match="default_threshold=2.0: give a number from 0 to 1"):
        create_app(lambda: det, samples=samples, default_threshold=2.0)


def test_the_banner_names_the_random_branches(tiny_clip, tiny_clip_config, tmp_path):
    """Detector.random_weights (what the banner says) follows from_config's rule."""
    clip = tmp_path / "clip.pth"
    torch.save(tiny_clip.state_dict(), clip)
    gt = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml"
    with one_torch_thread():
        rpn_only = Detector.from_config(tiny_cfg(C4_RPN, tiny_clip_config, extra=SMALL), clip_weights=str(clip),
                                        allow_random_weights=True)
        recognition = Detector.from_config(tiny_cfg(gt, tiny_clip_config, extra=SMALL), allow_random_weights=True)
    assert rpn_only.random_weights == "RPN branch"
    assert recognition.random_weights == "recognition"
    c = TestClient(create_app(lambda: rpn_only, samples={}))
    assert "RANDOM WEIGHTS (RPN branch)" in c.get("/").text
