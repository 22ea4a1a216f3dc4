"""What a detector calls each ground-truth object: the label of its top-scoring detection.

AP is computed class by class, so a detector can have a fair base-class AP while most base
objects are *shown* with another label: a lower-scored box of the right class still counts
for that class's AP, but the picture shows the top one. This summary counts, for every
ground-truth object, the class of the highest-scoring detection overlapping it (IoU >= 0.5):
right, wrong within its own split, or a class of the other split (novel names taking base
objects is the open-vocabulary failure the demo's pictures show).
"""
from collections import Counter
from typing import Dict, List


def _iou_xywh(a, b) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def top_label_breakdown(coco_gt: Dict, detections: List[Dict], iou: float = 0.5) -> Dict:
    """Args:
        coco_gt: a COCO instances dict (``images``, ``annotations``, ``categories``; a category's
            ``split`` is ``"base"`` or ``"novel"``, default base).
        detections: COCO results (``image_id``, ``category_id``, ``bbox`` XYWH, ``score``).
    Returns:
        ``{"objects", "missed", "<split>": {"objects", "right", "wrong_same_split",
        "other_split"}, "other_split_labels": {split: {class name: count}}}`` where ``missed``
        counts objects no detection overlaps with IoU >= ``iou``.
    """
    cats = {c["id"]: c["name"] for c in coco_gt["categories"]}
    split = {c["id"]: c.get("split", "base") for c in coco_gt["categories"]}
    by_image: Dict[int, List[Dict]] = {}
    for d in detections:
        by_image.setdefault(d["image_id"], []).append(d)
    out = {"objects": 0, "missed": 0}
    stolen: Dict[str, Counter] = {}
    for a in coco_gt["annotations"]:
        s = split[a["category_id"]]
        row = out.setdefault(s, {"objects": 0, "right": 0, "wrong_same_split": 0, "other_split": 0})
        out["objects"] += 1
        row["objects"] += 1
        overlapping = [d for d in by_image.get(a["image_id"], []) if _iou_xywh(d["bbox"], a["bbox"]) >= iou]
        if not overlapping:
            out["missed"] += 1
            continue
        top = max(overlapping, key=lambda d: d["score"])["category_id"]
        if top == a["category_id"]:
            row["right"] += 1
        elif split[top] == s:
            row["wrong_same_split"] += 1
        else:
            row["other_split"] += 1
            stolen.setdefault(s, Counter())[cats[top]] += 1
    out["other_split_labels"] = {s: dict(c.most_common()) for s, c in stolen.items()}
    return out
