"""What :class:`~regionclip_d2.api.Detector` returns: :class:`Detections`, plain arrays in the
original image's pixels (and the detectron2 ``Instances`` on request)."""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

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


def merge_same_box_labels(boxes, labels: Sequence[str], ids: Optional[Sequence[int]] = None):
    """Detections that share one box (one region scored for several classes or phrases: the
    box regression is class-agnostic) -> one box whose label lists them all, in the given
    (best-first) order, for drawing: drawn one by one, their labels would be printed over
    each other. Returns (boxes as a list of ``[4]`` lists, labels, and the first of each
    box's ``ids`` if given, e.g. for its colour)."""
    order, merged, first = [], {}, {}
    ids = list(ids) if ids is not None else [None] * len(labels)
    for b, lab, i in zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4).tolist(), labels, ids):
        key = tuple(round(v, 2) for v in b)
        if key not in merged:
            order.append(key)
            merged[key], first[key] = [], i
        merged[key].append(lab)
    return [list(k) for k in order], [" | ".join(merged[k]) for k in order], [first[k] for k in order]
