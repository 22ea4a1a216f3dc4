"""What :class:`~regionclip_d2.api.Detector` returns: :class:`Detections`, plain arrays in the
original image's pixels (and the detectron2 ``Instances`` on request)."""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from detectron2.structures import Instances


@dataclass
class Detections:
    """The detections in one image, best first.

    Attributes:
        boxes: ``[N, 4]`` float32, XYXY, in pixels of the original image (as given, before the
            detector's resizing).
        scores: ``[N]`` float32 detection scores in [0, 1].
        labels: ``N`` class names (for an :class:`Exemplar` class, its name).
        label_ids: ``[N]`` int64 indices into ``class_names``.
        class_names: the vocabulary of the call, in label-id order.
        image_size: ``(height, width)`` of the original image in pixels.
        instances: the detectron2 ``Instances`` (CPU, same detections, same order) when asked
            for with ``return_instances=True``, else None.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: List[str]
    label_ids: np.ndarray
    class_names: List[str]
    image_size: Tuple[int, int]
    instances: Optional[Instances] = None

    def __len__(self) -> int:
        return len(self.scores)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (as ``tools/demo.py`` writes)."""
        return {"height": self.image_size[0], "width": self.image_size[1],
                "detections": [{"box_xyxy": [float(v) for v in b], "score": float(s), "class_id": int(c),
                                "class_name": n}
                               for b, s, c, n in zip(self.boxes, self.scores, self.label_ids, self.labels)]}
