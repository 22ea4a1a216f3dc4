"""Deployment: the recognition branch with the vocabulary folded in, as ONNX (and a
``torch.export`` program). See ``tools/export.py``."""
from .onnx import OPSET, TOLERANCE, OnnxRecognizer, export_detector, export_onnx
from .recognition import MIN_SIDE, RecognitionGraph, detections

__all__ = ["RecognitionGraph", "detections", "MIN_SIDE", "export_onnx", "export_detector", "OnnxRecognizer",
           "TOLERANCE", "OPSET"]
