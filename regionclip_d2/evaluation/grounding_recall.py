"""Phrase grounding recall@k, the Flickr30k Entities protocol (GLIP / MDETR report it).

For each phrase of a caption, the model ranks boxes; the phrase counts as found at ``k``
when any of its ``k`` best boxes has IoU >= 0.5 with the phrase's ground truth, the union
box of all the boxes the phrase refers to (one box covering them all). A phrase the model
gives no box is a miss at every ``k``. Recall@k = found phrases / phrases.

:func:`phrase_targets` reads the phrases and their union boxes from a grounding dataset
dict (:func:`regionclip_d2.grounding.data.load_grounding_json`): the annotations that
share the same ``tokens_positive`` spans form one phrase.
"""
from typing import Dict, List, Sequence

import torch

from detectron2.structures import Boxes, BoxMode, pairwise_iou

__all__ = ["phrase_targets", "phrase_recall"]


def phrase_targets(dataset_dict: dict) -> List[dict]:
    """``[{"phrase", "spans", "box"}]``: the caption's grounded phrases in the order of their
    first character, ``spans`` their character spans, ``box`` the XYXY union of their boxes."""
    caption = dataset_dict["caption"]
    groups: Dict[tuple, List[List[float]]] = {}
    for a in dataset_dict.get("annotations", []):
        spans = tuple(tuple(int(v) for v in s) for s in a["tokens_positive"])
        if not spans:
            continue
        box = BoxMode.convert(list(a["bbox"]), a.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS)
        groups.setdefault(spans, []).append(box)
    out = []
    for spans in sorted(groups, key=lambda s: s[0]):
        b = torch.tensor(groups[spans], dtype=torch.float32)
        out.append({"phrase": " ".join(caption[s:e] for s, e in spans), "spans": [list(s) for s in spans],
                    "box": [float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())]})
    return out


def phrase_recall(ranked_boxes: Sequence, gt_boxes: Sequence, ks: Sequence[int] = (1, 5, 10),
                  iou_threshold: float = 0.5) -> Dict[str, float]:
    """Recall@k over phrases.

    Args:
        ranked_boxes: per phrase, its predicted XYXY boxes best first (``[K_i, 4]``, possibly empty).
        gt_boxes: per phrase, its ground-truth (union) XYXY box.
        ks: the ``k`` s to report.
    Returns:
        ``{"R@1": ..., "R@5": ..., "R@10": ..., "phrases": n}`` (recalls in percent).
    """
    if len(ranked_boxes) != len(gt_boxes):
        raise ValueError(f"{len(ranked_boxes)} ranked box lists for {len(gt_boxes)} phrases: give one per phrase")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"ks={list(ks)}: every k must be at least 1")
    found = {int(k): 0 for k in ks}
    for ranked, gt in zip(ranked_boxes, gt_boxes):
        ranked = torch.as_tensor(ranked, dtype=torch.float32).reshape(-1, 4)
        if ranked.shape[0] == 0:
            continue
        hits = pairwise_iou(Boxes(ranked), Boxes(torch.as_tensor(gt, dtype=torch.float32).reshape(1, 4)))[:, 0]
        hit = (hits >= iou_threshold).nonzero()
        if hit.numel() == 0:
            continue
        first = int(hit[0])  # rank of the first box that finds the phrase (0 = the best box)
        for k in found:
            found[k] += int(first < k)
    n = len(gt_boxes)
    out = {f"R@{k}": (100.0 * v / n if n else float("nan")) for k, v in found.items()}
    out["phrases"] = n
    return out
