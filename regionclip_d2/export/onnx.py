"""ONNX export of the recognition branch (vocabulary folded in) and a runner for the result.

``export_onnx`` writes ``<name>.onnx`` (the :class:`RecognitionGraph`, through ``torch.export``,
dynamic image size and region count) and ``<name>.json`` (class names, how to prepare the
inputs, the post-processing settings, the measured agreement with eager PyTorch).
``OnnxRecognizer`` runs it with onnxruntime: it resizes the image as the detector does, runs
the graph, and applies the detector's post-processing, so that its detections for given boxes
equal the PyTorch detector's (checked by the tests to the tolerances in ``TOLERANCE``).
"""
import json
import os
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .recognition import RecognitionGraph, detections

__all__ = ["export_onnx", "export_detector", "OnnxRecognizer", "TOLERANCE", "OPSET"]

OPSET = 18
# agreement of onnxruntime with eager PyTorch (float32, CPU) that export checks and the tests hold:
# absolute difference of probabilities, of box coordinates in input pixels, of unit-norm embeddings
TOLERANCE = {"scores": 1e-5, "pred_boxes": 1e-3, "embeddings": 1e-5}


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({e}): run make setup, or "
                          "pip install onnx onnxscript onnxruntime") from None


def _sample_inputs(min_side: int, seed: int = 0, regions: int = 3):
    """A random image a little larger than ``min_side`` (a different size per seed) and boxes in it."""
    g = torch.Generator().manual_seed(seed)
    h, w = min_side + 31 + 7 * seed, min_side + 63 - 11 * seed
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    xy = torch.rand(regions, 2, generator=g) * torch.tensor([w / 2, h / 2])
    wh = (torch.rand(regions, 2, generator=g) * 0.5 + 0.1) * torch.tensor([w, h])
    return image, torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h]).float())], dim=1)


def export_onnx(model, vocabulary: torch.Tensor, names: Sequence[str], path: str, *, min_size_test: int,
                max_size_test: int, check: bool = True, extra_info: Optional[Dict] = None,
                pt2: bool = False, logit_affine: Optional[torch.Tensor] = None) -> Dict:
    """Export ``model``'s recognition branch with ``vocabulary`` (``[C, D]``, ``names``) folded in.

    Args:
        model: a :class:`CLIPFastRCNN` (C4 or FPN), eval mode, float32, on any device (exported on CPU).
        path: the ``.onnx`` file to write; ``<path without .onnx>.json`` describes it.
        min_size_test, max_size_test: the detector's ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``,
            recorded so that a runner resizes images as the detector does.
        logit_affine: ``[C, 2]`` per-class (scale, bias) of the cosines (calibrated exemplars).
        check: run the file with onnxruntime on two inputs of different sizes and region counts
            and compare with eager PyTorch (``TOLERANCE``); a larger difference raises.
        extra_info: more entries for the JSON (config, weights, ...).
        pt2: also save the ``torch.export`` program (``<path without .onnx>.pt2``,
            ``torch.export.load`` reads it).
    Returns:
        the JSON's content.
    """
    _require_onnx()
    if not path.endswith(".onnx"):
        raise ValueError(f"{path!r}: the output file name must end in .onnx")
    if min_size_test <= 0:
        raise ValueError(f"INPUT.MIN_SIZE_TEST={min_size_test}: the exported graph's runner resizes images as the "
                         "detector does; set a positive INPUT.MIN_SIZE_TEST")
    graph = RecognitionGraph(model, vocabulary, names, logit_affine).cpu().eval()
    image, boxes = _sample_inputs(graph.min_side)
    h, w = torch.export.Dim("height", min=graph.min_side), torch.export.Dim("width", min=graph.min_side)
    dynamic = {"image": {1: h, 2: w}, "boxes": {0: torch.export.Dim("regions", min=1)}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad():
        program = torch.export.export(graph, (image, boxes), dynamic_shapes=dynamic)
        torch.onnx.export(program, (image, boxes), path, input_names=["image", "boxes"],
                          output_names=["scores", "pred_boxes", "embeddings"], opset_version=OPSET,
                          dynamo=True, external_data=False)
    stem = path[:-len(".onnx")]
    if pt2:
        torch.export.save(program, stem + ".pt2")
    info = {
        "format": "regionclip_d2 recognition graph",
        "class_names": list(names),
        "num_classes": len(names),
        "embed_dim": int(graph.classifier.shape[1]),
        "inputs": {
            "image": "uint8 [3, H, W], RGB, resized so that the short side is min_size_test and the long side at "
                     "most max_size_test (detectron2's ResizeShortestEdge, bilinear); H, W >= min_side",
            "boxes": "float32 [N, 4], XYXY in the resized image's pixels, N >= 1",
        },
        "outputs": {
            "scores": "float32 [N, C + 1], class probabilities, the background last",
            "pred_boxes": "float32 [N, 4] (or [N, 4 C]), the boxes refined by the box deltas (the input boxes "
                          "when the config sets MODEL.CLIP.NO_BOX_DELTA)",
            "embeddings": "float32 [N, D], L2-normalised region embeddings in the text space",
        },
        "min_size_test": int(min_size_test),
        "max_size_test": int(max_size_test),
        "score_thresh": float(model.roi_heads.box_predictor.test_score_thresh),
        "nms_thresh": float(model.roi_heads.box_predictor.test_nms_thresh),
        "topk": int(model.roi_heads.box_predictor.test_topk_per_image),
        "min_side": graph.min_side,
        "opset": OPSET,
        "tolerance": TOLERANCE,
    }
    info.update(extra_info or {})
    if check:
        info["check"] = check_onnx(path, graph)
    with open(stem + ".json", "w") as f:
        json.dump(info, f, indent=1)
    return info


def export_detector(detector, path: str, classes=None, **kwargs) -> Dict:
    """:func:`export_onnx` for a :class:`regionclip_d2.Detector`: ``classes`` as its calls take
    them (names and ``Exemplar`` objects, or None for the configured vocabulary) become the folded
    classifier, with the detector's exemplar calibration, if any."""
    emb, names = detector.vocabulary(classes)
    kwargs.setdefault("logit_affine", detector.logit_affine(classes))
    if names is None:
        names = [f"class {i}" for i in range(emb.shape[0])]
    model = detector.model
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("export runs on CPU: build the Detector with device='cpu'")
    return export_onnx(model, emb, names, path, min_size_test=detector.min_size_test,
                       max_size_test=detector.max_size_test, **kwargs)


def check_onnx(path: str, graph: RecognitionGraph) -> Dict:
    """Largest differences between onnxruntime and eager PyTorch on two inputs (different
    sizes and region counts); raises when one exceeds ``TOLERANCE``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = {k: 0.0 for k in TOLERANCE}
    for img, b in (_sample_inputs(graph.min_side), _sample_inputs(graph.min_side, seed=1, regions=5)):
        with torch.no_grad():
            ref = graph(img, b)
        got = sess.run(None, {"image": img.numpy(), "boxes": b.numpy()})
        for k, r, o in zip(TOLERANCE, ref, got):
            worst[k] = max(worst[k], float(np.abs(r.numpy() - o).max()))
    bad = {k: v for k, v in worst.items() if v > TOLERANCE[k]}
    if bad:
        raise RuntimeError(f"the ONNX graph differs from PyTorch by {bad} (tolerance {TOLERANCE}): "
                           "onnxruntime or the exporter changed the computation; please report it")
    return {"max_abs_diff": worst}


class OnnxRecognizer:
    """Run an exported recognition graph with onnxruntime: classify given boxes of an image.

    ``OnnxRecognizer("recognition.onnx")(rgb, boxes)`` takes an ``H x W x 3`` uint8 RGB array and
    ``[N, 4]`` XYXY boxes in its pixels, and returns detectron2 ``Instances`` in the image's
    pixels (``pred_boxes``, ``scores``, ``pred_classes`` indexing ``class_names``), made as the
    PyTorch detector makes them for given boxes (``MODEL.CLIP.CROP_REGION_TYPE GT``)."""

    def __init__(self, path: str, providers: Sequence[str] = ("CPUExecutionProvider",)):
        _require_onnx()
        import onnxruntime as ort

        stem = path[:-len(".onnx")] if path.endswith(".onnx") else path
        if not os.path.isfile(stem + ".json"):
            raise FileNotFoundError(f"{stem}.json not found: it is written next to the .onnx file by "
                                    "tools/export.py; keep the two together")
        with open(stem + ".json") as f:
            self.info = json.load(f)
        self.class_names = self.info["class_names"]
        self.session = ort.InferenceSession(stem + ".onnx", providers=list(providers))

    def __call__(self, rgb: np.ndarray, boxes, score_thresh: Optional[float] = None):
        from detectron2.data import transforms as T

        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"image of dtype {rgb.dtype} and shape {rgb.shape}: expected H x W x 3 uint8 RGB")
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            raise ValueError("no boxes: give at least one [x0, y0, x1, y1] box to classify")
        h, w = rgb.shape[:2]
        newh, neww = T.ResizeShortestEdge.get_output_shape(h, w, self.info["min_size_test"],
                                                           self.info["max_size_test"])
        tfm = T.ResizeTransform(h, w, newh, neww)
        image = tfm.apply_image(rgb)
        if min(image.shape[:2]) < self.info["min_side"]:
            raise ValueError(f"the resized image is {image.shape[1]} x {image.shape[0]}: the graph needs at least "
                             f"{self.info['min_side']} px a side; use a less elongated image, or export with a "
                             "larger INPUT.MAX_SIZE_TEST")
        scaled = tfm.apply_box(boxes).astype(np.float32)
        scores, pred_boxes, _ = self.session.run(None, {"image": np.ascontiguousarray(image.transpose(2, 0, 1)),
                                                        "boxes": scaled})
        thresh = self.info["score_thresh"] if score_thresh is None else score_thresh
        return detections(torch.from_numpy(scores), torch.from_numpy(pred_boxes), (newh, neww), (h, w),
                          thresh, self.info["nms_thresh"], self.info["topk"])
