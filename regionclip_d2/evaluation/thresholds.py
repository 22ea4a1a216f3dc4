"""Per-class score thresholds: resolving them for a vocabulary, reading them from a JSON file,
and calibrating them on a validation set to a target precision.

A threshold setting is a number (every class) or a mapping ``{class name: score}``; classes
missing from the mapping use a default. :func:`calibrate_thresholds` returns such a mapping
(one entry per class), which :class:`regionclip_d2.Detector` and ``tools/demo.py
--class-thresholds`` take as it is (``json.dump`` it for the demo).
"""
import json
import math
import os
from numbers import Real
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["class_thresholds", "load_class_thresholds", "calibrate_thresholds", "ThresholdError"]

Threshold = Union[float, Mapping[str, float]]


class ThresholdError(ValueError):
    pass


def _check_value(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ThresholdError(f"{what} must be a finite number (a score in [0, 1]), got {value!r}")
    return float(value)


def class_thresholds(threshold: Threshold, class_names: Sequence[str], default: float = 0.3) -> np.ndarray:
    """The score threshold of each class, ``[C]`` float64 in score units (scores are in [0, 1]).

    Args:
        threshold: one number for every class, or ``{class name: score}``; classes missing from
            the mapping use ``default``. A name that is not in ``class_names`` is an error (a typo
            would otherwise silently leave its class at the default).
        class_names: the vocabulary, in label-id order.
        default: the threshold of classes missing from a mapping.
    """
    names = list(class_names)
    if not isinstance(threshold, Mapping):
        return np.full(len(names), _check_value(threshold, "threshold"), dtype=np.float64)
    default = _check_value(default, "the default threshold")
    index = {n: i for i, n in enumerate(names)}
    unknown = [k for k in threshold if k not in index]
    if unknown:
        raise ThresholdError(f"per-class thresholds name {len(unknown)} class(es) that are not in the vocabulary: "
                             f"{unknown[:10]}; thresholds are keyed by class name (vocabulary: {names[:10]}"
                             f"{' ...' if len(names) > 10 else ''}): fix or remove those entries")
    out = np.full(len(names), default, dtype=np.float64)
    for k, v in threshold.items():
        out[index[k]] = _check_value(v, f"the threshold of {k!r}")
    return out


def load_class_thresholds(path: str) -> Dict[str, float]:
    """``{class name: score}`` from a JSON file holding one object (e.g. what
    :func:`calibrate_thresholds` returned, written with ``json.dump``)."""
    if not os.path.isfile(path):
        raise ThresholdError(f"class-thresholds file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ThresholdError(f"class-thresholds file {path!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ThresholdError(f"class-thresholds file {path!r} must hold one JSON object "
                             '{"class name": score, ...}, not a ' + type(data).__name__)
    return {str(k): _check_value(v, f"{path!r}: the threshold of {k!r}") for k, v in data.items()}


# ---------------------------------------------------------------------------------- calibration
def _iou_matrix(a: np.ndarray, b: np.ndarray, crowd: bool = False) -> np.ndarray:
    """``[N, M]`` IoU of XYXY boxes (``crowd``: intersection over the area of ``a``, as
    COCO compares detections with crowd regions)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    denom = area_a[:, None] if crowd else area_a[:, None] + area_b[None, :] - inter
    return np.where(denom > 0, inter / np.maximum(denom, 1e-12), 0.0)


def _as_arrays(det, class_names: List[str], where: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes ``[N, 4]`` XYXY, scores ``[N]``, label ids ``[N]``) from one image's detections."""
    if isinstance(det, dict) and "instances" in det:
        det = det["instances"]
    if hasattr(det, "pred_boxes") and hasattr(det, "pred_classes"):  # detectron2 Instances
        det = det.to("cpu")
        return (det.pred_boxes.tensor.numpy().astype(np.float64), det.scores.numpy().astype(np.float64),
                det.pred_classes.numpy().astype(np.int64))
    get = det.get if isinstance(det, dict) else (lambda k, d=None: getattr(det, k, d))
    boxes, scores = get("boxes"), get("scores")
    if boxes is None or scores is None:
        raise ValueError(f"{where}: detections must be a regionclip_d2 Detections, detectron2 Instances, "
                         "{'instances': Instances} or a dict with 'boxes' (XYXY), 'scores' and 'label_ids' or "
                         "'labels'")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    ids = get("label_ids")
    if ids is None:
        labels = get("labels")
        if labels is None:
            raise ValueError(f"{where}: detections need 'label_ids' (indices into class_names) or 'labels' (names)")
        index = {n: i for i, n in enumerate(class_names)}
        missing = sorted({str(n) for n in labels if n not in index})
        if missing:
            raise ValueError(f"{where}: detection labels {missing[:5]} are not in class_names")
        ids = [index[n] for n in labels]
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(ids):
        raise ValueError(f"{where}: {len(boxes)} boxes, {len(scores)} scores and {len(ids)} labels: give one each "
                         "per detection")
    return boxes, scores, ids


def _gt_arrays(record: dict, num_classes: int, where: str):
    """(boxes ``[G, 4]`` XYXY, category ids ``[G]``, crowd flags ``[G]``) of a dataset dict."""
    from detectron2.structures import BoxMode

    boxes, cats, crowd = [], [], []
    for a in record.get("annotations", []):
        mode = a.get("bbox_mode", BoxMode.XYWH_ABS)
        boxes.append(BoxMode.convert(list(a["bbox"]), mode, BoxMode.XYXY_ABS))
        c = int(a["category_id"])
        if not 0 <= c < num_classes:
            raise ValueError(f"{where}: category_id {c} is not an index into class_names ({num_classes} classes); "
                             "give detectron2 dataset dicts (contiguous ids, e.g. DatasetCatalog.get(name)) and "
                             "MetadataCatalog.get(name).thing_classes")
        cats.append(c)
        crowd.append(bool(a.get("iscrowd", 0)))
    return (np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(cats, dtype=np.int64),
            np.asarray(crowd, dtype=bool))


def _match(boxes: np.ndarray, scores: np.ndarray, gt: np.ndarray, crowd: np.ndarray, iou: float) -> np.ndarray:
    """Per detection of one class in one image: 1 true positive, 0 false positive, -1 ignored
    (on a crowd region). Greedy in decreasing score (COCO's rule): a detection takes the
    unmatched ground-truth box it overlaps most with IoU >= ``iou``."""
    order = np.argsort(-scores, kind="stable")
    out = np.zeros(len(boxes), dtype=np.int64)
    real, crowd_boxes = gt[~crowd], gt[crowd]
    ious = _iou_matrix(boxes, real)
    ioa = _iou_matrix(boxes, crowd_boxes, crowd=True)
    taken = np.zeros(len(real), dtype=bool)
    for i in order:
        cand = np.where(~taken & (ious[i] >= iou))[0] if len(real) else np.zeros(0, dtype=np.int64)
        if len(cand):
            j = cand[np.argmax(ious[i, cand])]
            taken[j] = True
            out[i] = 1
        elif len(crowd_boxes) and (ioa[i] >= iou).any():
            out[i] = -1
    return out


def calibrate_thresholds(detections, dataset_dicts: Sequence[dict], class_names: Sequence[str],
                         target_precision: float = 0.9, iou: float = 0.5, epsilon: float = 1e-6,
                         return_stats: bool = False):
    """Per-class score thresholds that reach ``target_precision`` on a validation set.

    For each class, its detections over all images are matched to its ground-truth boxes
    (greedy in decreasing score, IoU >= ``iou``, each box matched once, as COCO does; a
    detection on a crowd region, intersection over its own area >= ``iou``, is ignored).
    Every distinct detection score ``s`` is a candidate threshold, with precision
    ``TP(score >= s) / N(score >= s)``; the class's threshold is the **lowest** candidate whose
    precision is >= ``target_precision`` (the most recall at that precision; precision is not
    monotonic in the threshold, every candidate is checked). A class that never reaches the
    target gets its highest detection score + ``epsilon`` (none of its detections pass);
    a class without any detection gets ``1 + epsilon`` (above every probability).

    Args:
        detections: one entry per image of ``dataset_dicts`` (a sequence in the same order,
            or a mapping from ``image_id``): a :class:`regionclip_d2.Detections`, a detectron2
            ``Instances`` (or ``{"instances": ...}``, a model output), or a dict with ``boxes``
            ``[N, 4]`` XYXY, ``scores`` ``[N]`` and ``label_ids`` ``[N]`` (or ``labels``, names).
            Boxes in the image's pixels, the frame of its annotations. Detect with a threshold
            below the ones you want to find (e.g. 0.0 or 0.05).
        dataset_dicts: detectron2 dataset dicts of the validation set (``DatasetCatalog.get(name)``
            of a registered COCO-format set): ``image_id`` and ``annotations`` with ``bbox``,
            ``bbox_mode``, ``category_id`` (an index into ``class_names``), optional ``iscrowd``.
        class_names: the vocabulary, in label-id order (``MetadataCatalog.get(name).thing_classes``).
        target_precision: the precision to reach, in [0, 1].
        iou: the IoU from which a detection matches a ground-truth box.
        epsilon: added to the highest score of a class that never reaches the target.
        return_stats: also return, per class, ``precision`` and ``recall`` at the chosen threshold,
            ``num_gt``, ``num_detections`` and ``reached``.
    Returns:
        ``{class name: threshold}`` for every class (and the stats when ``return_stats``).
    """
    names = list(class_names)
    if not 0.0 <= float(target_precision) <= 1.0:
        raise ValueError(f"target_precision={target_precision}: give a precision in [0, 1]")
    if not 0.0 < float(iou) <= 1.0:
        raise ValueError(f"iou={iou}: give an IoU in (0, 1]")
    records = list(dataset_dicts)
    if isinstance(detections, Mapping):
        missing = [r.get("image_id") for r in records if r.get("image_id") not in detections]
        if missing:
            raise ValueError(f"no detections for image_id(s) {missing[:5]}: give an entry (possibly empty) per image")
        detections = [detections[r["image_id"]] for r in records]
    else:
        detections = list(detections)
    if len(detections) != len(records):
        raise ValueError(f"{len(detections)} detection entries for {len(records)} images: give one per image, "
                         "in the order of dataset_dicts (or a mapping from image_id)")
    per_class_scores: List[List[np.ndarray]] = [[] for _ in names]
    per_class_tp: List[List[np.ndarray]] = [[] for _ in names]
    num_gt = np.zeros(len(names), dtype=np.int64)
    for k, (det, rec) in enumerate(zip(detections, records)):
        where = f"image {rec.get('image_id', k)!r}"
        boxes, scores, ids = _as_arrays(det, names, where)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(names)):
            raise ValueError(f"{where}: label id {int(ids.max())} is outside class_names ({len(names)} classes)")
        gt, cats, crowd = _gt_arrays(rec, len(names), where)
        np.add.at(num_gt, cats[~crowd], 1)
        for c in np.unique(np.concatenate([ids, cats])):
            d = ids == c
            g = cats == c
            m = _match(boxes[d], scores[d], gt[g], crowd[g], iou)
            keep = m >= 0
            per_class_scores[c].append(scores[d][keep])
            per_class_tp[c].append(m[keep])
    thresholds: Dict[str, float] = {}
    stats: Dict[str, dict] = {}
    for c, name in enumerate(names):
        s = np.concatenate(per_class_scores[c]) if per_class_scores[c] else np.zeros(0)
        tp = np.concatenate(per_class_tp[c]) if per_class_tp[c] else np.zeros(0, dtype=np.int64)
        thr, prec, rec_ = _pick(s, tp, int(num_gt[c]), float(target_precision), epsilon)
        thresholds[name] = thr
        stats[name] = {"precision": prec, "recall": rec_, "num_gt": int(num_gt[c]), "num_detections": int(len(s)),
                       "reached": prec is not None}
    return (thresholds, stats) if return_stats else thresholds


def _pick(scores: np.ndarray, tp: np.ndarray, num_gt: int, target: float,
          epsilon: float) -> Tuple[float, Optional[float], Optional[float]]:
    """(threshold, precision, recall at it) for one class; precision None when unreached."""
    if len(scores) == 0:
        return 1.0 + epsilon, None, None
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], tp[order]
    cum_tp = np.cumsum(t)
    n = np.arange(1, len(s) + 1)
    last = np.r_[s[1:] != s[:-1], True]  # the last detection of each run of equal scores: "score >= s" ends there
    precision = cum_tp[last] / n[last]
    candidates = s[last]
    ok = np.where(precision >= target)[0]
    if not len(ok):
        return float(s[0]) + epsilon, None, None
    i = ok[-1]  # candidates are in decreasing order: the last that reaches the target is the lowest
    recall = float(cum_tp[last][i] / num_gt) if num_gt else None
    return float(candidates[i]), float(precision[i]), recall
