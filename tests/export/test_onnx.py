"""ONNX export of the recognition branch with the vocabulary folded in (regionclip_d2.export,
tools/export.py): onnxruntime gives what eager PyTorch gives (C4 and FPN, dynamic image size
and region count), the runner's detections for given boxes equal the Detector's, names and
exemplars fold in together, and bad input is named."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import tiny_cfg

from detectron2.modeling import build_model

from regionclip_d2 import Detector, Exemplar
from regionclip_d2.export import TOLERANCE, OnnxRecognizer, RecognitionGraph, export_detector

pytest.importorskip("onnxruntime", reason="onnxruntime is installed by make setup")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
C4_GT = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml"
FPN_GT = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_FPN_zsinf_GT.yaml"
# the default score threshold (0.001): onnxruntime flushes subnormal probabilities to zero, so a
# threshold of 0 would compare 1e-39 with 0
SMALL = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.001, "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 160]


def scene(h=150, w=200, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 150, (h, w, 3), dtype=np.uint8)
    img[20:80, 30:100] = (220, 30, 30)
    img[90:140, 120:190] = (30, 30, 220)
    return img


BOXES = [[30, 20, 100, 80], [120, 90, 190, 140], [0, 0, 200, 150], [60, 60, 75, 70]]


@pytest.mark.parametrize("config, box_deltas, calibrated", [(C4_GT, False, True), (FPN_GT, True, False)])
def test_onnx_equals_pytorch_and_the_runner_equals_the_detector(config, box_deltas, calibrated, tiny_clip_config,
                                                               tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(config, tiny_clip_config, extra=SMALL + ["MODEL.CLIP.NO_BOX_DELTA", not box_deltas])
    det = Detector.from_config(cfg, device="cpu", allow_random_weights=True)
    classes = ["cat", Exemplar("blue block", image=scene(seed=3), boxes=[[120, 90, 190, 140]]), "dog"]
    if calibrated:  # the per-class affine map of calibrated exemplars is folded into the classifier too
        det.calibrate_exemplars([Exemplar("cat", image=scene(seed=4), boxes=[[30, 20, 100, 80], [0, 0, 90, 70]])])
    path = str(tmp_path / "out" / "recognition.onnx")
    info = export_detector(det, path, classes=classes, pt2=True)
    assert info["class_names"] == ["cat", "blue block", "dog"]
    assert all(info["check"]["max_abs_diff"][k] <= TOLERANCE[k] for k in TOLERANCE)
    with open(str(tmp_path / "out" / "recognition.json")) as f:
        assert json.load(f)["min_size_test"] == 96
    # the runner (resize, graph in onnxruntime, post-processing) against the Detector on given boxes
    img = scene(seed=1)
    ref = det(img, classes=classes, boxes=BOXES, threshold=0.0)
    got = OnnxRecognizer(path)(img, BOXES)
    assert len(got) == len(ref.scores) > 0
    assert got.pred_classes.tolist() == list(ref.label_ids)
    np.testing.assert_allclose(got.scores.numpy(), ref.scores, atol=TOLERANCE["scores"])
    np.testing.assert_allclose(got.pred_boxes.tensor.numpy(), ref.boxes, atol=TOLERANCE["pred_boxes"])
    if box_deltas:  # the regression moved the boxes: the graph applies it as the detector does
        assert not np.allclose(np.sort(got.pred_boxes.tensor.numpy(), axis=0), np.sort(np.asarray(BOXES), axis=0))
    # the torch.export program, loaded back, computes the same graph
    program = torch.export.load(str(tmp_path / "out" / "recognition.pt2"))
    x = torch.as_tensor(scene(seed=2)[:100, :120].transpose(2, 0, 1).copy())
    b = torch.tensor([[5.0, 5.0, 60.0, 50.0]])
    graph = RecognitionGraph(det.model, *det.vocabulary(classes), det.logit_affine(classes))
    with torch.no_grad():
        for a, r in zip(program.module()(x, b), graph(x, b)):
            torch.testing.assert_close(a, r, atol=1e-5, rtol=0)


def test_bad_input_is_named(tiny_clip_config, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(C4_GT, tiny_clip_config, extra=SMALL)).eval()
    with pytest.raises(ValueError, match="dim 32 but the detector produces 64"):
        RecognitionGraph(model, torch.randn(3, 32))
    with pytest.raises(ValueError, match="expected \\[C, D\\]"):
        RecognitionGraph(model, torch.randn(0, 64))
    grounding = build_model(tiny_cfg(C4_GT, tiny_clip_config, extra=SMALL + ["MODEL.GROUNDING.ENABLED", True,
                                                                             "MODEL.GROUNDING.ALIGN_DIM", 32]))
    with pytest.raises(ValueError, match="grounding head"):
        RecognitionGraph(grounding.eval(), torch.randn(3, 64))
    det = Detector.from_config(tiny_cfg(C4_GT, tiny_clip_config, extra=SMALL), device="cpu",
                               allow_random_weights=True)
    with pytest.raises(ValueError, match="must end in .onnx"):
        export_detector(det, str(tmp_path / "model.bin"), classes=["cat"], check=False)
    path = str(tmp_path / "m.onnx")
    export_detector(det, path, classes=["cat", "dog"], check=False)
    runner = OnnxRecognizer(path)
    with pytest.raises(ValueError, match="no boxes"):
        runner(scene(), np.zeros((0, 4)))
    with pytest.raises(ValueError, match="uint8 RGB"):
        runner(scene().astype(np.float32), BOXES)
    os.remove(str(tmp_path / "m.json"))
    with pytest.raises(FileNotFoundError, match="keep the two together"):
        OnnxRecognizer(path)


def test_export_tool(tiny_clip_config, tmp_path):
    """tools/export.py: random weights only when asked (and then said), names from --custom-vocabulary."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "export.py"), "--config-file", C4_GT, "--output",
           str(tmp_path / "exp"), "--vocabulary", "custom", "--custom-vocabulary", "cat,dog,remote control",
           "--opts", "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config, "MODEL.CLIP.TEXT_EMB_DIM", "64",
           "MODEL.CLIP.PROMPT_TEMPLATES", "single", "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "4",
           "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "160"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode != 0 and "--random-weights" in r.stderr
    r = subprocess.run(cmd[:2] + ["--random-weights"] + cmd[2:], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "THE WEIGHTS ARE RANDOM" in r.stdout + r.stderr
    with open(str(tmp_path / "exp" / "recognition.json")) as f:
        info = json.load(f)
    assert info["class_names"] == ["cat", "dog", "remote control"] and info["random_weights"] is True
    assert "max_abs_diff" in info["check"] and os.path.isfile(str(tmp_path / "exp" / "recognition.onnx"))
