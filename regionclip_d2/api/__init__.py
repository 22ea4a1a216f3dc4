"""A one-call Python API for open-vocabulary detection.

::

    from regionclip_d2 import Detector, Exemplar

    det = Detector.from_config("configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml",
                               weights="regionclip_rn50.pth", rpn_weights="rpn_lvis_866.pth")
    result = det("photo.jpg", classes=["cat", "remote control"], threshold=0.3)
    result.boxes, result.scores, result.labels   # [N, 4] XYXY pixels of photo.jpg, [N], N names

:class:`Detector` builds the model exactly as detectron2's ``DefaultPredictor`` does (which keeps
working: ``get_regionclip_cfg`` -> ``build_model`` -> a checkpointer loading ``MODEL.WEIGHTS``),
with the project's checkpointer (weights only unless ``MODEL.CLIP.TRUST_CHECKPOINTS``), and takes
RGB images (paths, PIL images, ``H x W x 3`` uint8 arrays) where ``DefaultPredictor`` takes BGR
arrays. A class is a name (embedded by the CLIP text encoder, cached in memory per name) or an
:class:`Exemplar`: boxes on example images, embedded by the detector's own region encoder.
"""
from .detector import Detector
from .inputs import ClassSpec, DetectorInputError, Exemplar, load_rgb
from .results import Detections

__all__ = ["Detector", "Detections", "Exemplar", "DetectorInputError", "ClassSpec", "load_rgb"]
