"""Phrase grounding recall@k, the Flickr30k Entities protocol (GLIP / MDETR report it).

For each phrase of a caption, the model ranks boxes; the phrase counts as found at ``k``
when any of its ``k`` best boxes has IoU >= 0.5 with the phrase's ground truth, the union
box of all the boxes the phrase refers to (one box covering them all). A phrase the model
gives no box is a miss at every ``k``. Recall@k = found phrases / phrases.

:func:`phrase_targets` reads the phrases and their union boxes from a grounding dataset
dict (:func:`regionclip_d2.grounding.data.load_grounding_json`): the annotations that
share the same ``tokens_positive`` spans form one phrase.
"""
import json
import logging
import os
from typing import Dict, List, Optional, Sequence

import torch

import detectron2.utils.comm as comm
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Boxes, BoxMode, pairwise_iou

__all__ = ["phrase_targets", "phrase_recall", "first_hit", "GroundingEvaluator"]

logger = logging.getLogger(__name__)


def phrase_targets(dataset_dict: dict) -> List[dict]:
    """``[{"phrase", "spans", "box", "boxes", "categories"}]``: the caption's grounded phrases
    in the order of their first character, ``spans`` their character spans, ``box`` the XYXY
    union of their boxes, ``boxes`` how many, ``categories`` their ``category_id`` s."""
    caption = dataset_dict["caption"]
    groups: Dict[tuple, List[List[float]]] = {}
    cats: Dict[tuple, set] = {}
    for a in dataset_dict.get("annotations", []):
        spans = tuple(tuple(int(v) for v in s) for s in a["tokens_positive"])
        if not spans:
            continue
        box = BoxMode.convert(list(a["bbox"]), a.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS)
        groups.setdefault(spans, []).append(box)
        cats.setdefault(spans, set()).add(a.get("category_id"))
    out = []
    for spans in sorted(groups, key=lambda s: s[0]):
        b = torch.tensor(groups[spans], dtype=torch.float32)
        out.append({"phrase": " ".join(caption[s:e] for s, e in spans), "spans": [list(s) for s in spans],
                    "box": [float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())],
                    "boxes": len(b), "categories": sorted(cats[spans])})
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
    return recall_from_ranks([first_hit(r, g, iou_threshold) for r, g in zip(ranked_boxes, gt_boxes)], ks)


def first_hit(ranked, gt_box, iou_threshold: float = 0.5) -> Optional[int]:
    """Rank (0 = the best box) of the first of ``ranked`` XYXY boxes with IoU >=
    ``iou_threshold`` with ``gt_box``, or ``None`` if none has."""
    ranked = torch.as_tensor(ranked, dtype=torch.float32).reshape(-1, 4)
    if ranked.shape[0] == 0:
        return None
    ious = pairwise_iou(Boxes(ranked), Boxes(torch.as_tensor(gt_box, dtype=torch.float32).reshape(1, 4)))[:, 0]
    hit = (ious >= iou_threshold).nonzero()
    return int(hit[0]) if hit.numel() else None


def recall_from_ranks(ranks: Sequence[Optional[int]], ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Recall@k (percent) from each phrase's :func:`first_hit` rank (``None``: never found)."""
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"ks={list(ks)}: every k must be at least 1")
    n = len(ranks)
    out = {f"R@{int(k)}": (100.0 * sum(r is not None and r < int(k) for r in ranks) / n if n else float("nan"))
           for k in ks}
    out["phrases"] = n
    return out


class GroundingEvaluator(DatasetEvaluator):
    """Phrase grounding recall@k of a registered grounding data set (``evaluator_type``
    ``grounding``, :func:`~regionclip_d2.grounding.data.register_grounding_dataset`), as
    ``tools/train_net.py --eval-only`` runs it.

    The inputs carry ``grounding`` (:class:`~regionclip_d2.grounding.mapper.GroundingDatasetMapper`),
    so a detection's class ``k`` is phrase ``k`` of its image's caption, in the order of
    :func:`phrase_targets`; a phrase's boxes are its detections, best score first. Reported:
    recall@k over all phrases and, where the data set's metadata lists ``novel_classes``,
    over phrases naming a novel class (any of their boxes) and the others. Each phrase's
    result goes to ``<output_dir>/grounding_phrases.json`` (caption, phrase, rank of the
    first box that finds it or null, its categories).
    """

    def __init__(self, dataset_name: str, ks: Sequence[int] = (1, 5, 10), output_dir: Optional[str] = None,
                 iou_threshold: float = 0.5):
        if any(int(k) < 1 for k in ks):
            raise ValueError(f"ks={list(ks)}: every k must be at least 1")
        self.ks = [int(k) for k in ks]
        self.iou_threshold = iou_threshold
        self.output_dir = output_dir
        self.dataset_name = dataset_name
        meta = MetadataCatalog.get(dataset_name)
        dicts = DatasetCatalog.get(dataset_name)
        self._targets = {d["image_id"]: (d["caption"], phrase_targets(d)) for d in dicts}
        names = list(meta.get("thing_classes", []) or [])
        novel = set(meta.get("novel_classes", []) or [])
        self._novel_ids = {i for i, n in enumerate(names) if n in novel} if novel else None
        self._ranks: Dict = {}

    def reset(self):
        self._ranks = {}

    def process(self, inputs, outputs):
        kmax = max(self.ks)
        for x, o in zip(inputs, outputs):
            if x["image_id"] not in self._targets:
                raise KeyError(f"image entry {x['image_id']!r} is not in {self.dataset_name}: evaluate the data set "
                               "the loader reads")
            _, targets = self._targets[x["image_id"]]
            inst = o["instances"].to("cpu")
            ranks = []
            for k, t in enumerate(targets):
                m = inst.pred_classes == k
                order = inst.scores[m].argsort(descending=True)[:kmax]
                ranks.append(first_hit(inst.pred_boxes.tensor[m][order], t["box"], self.iou_threshold))
            self._ranks[x["image_id"]] = ranks

    def evaluate(self):
        comm.synchronize()
        parts = comm.gather(self._ranks, dst=0)
        if not comm.is_main_process():
            return {}
        ranks = {}
        for p in parts:
            ranks.update(p)
        if not ranks:
            logger.warning("%s: no image was evaluated", self.dataset_name)
            return {}
        rows, groups = [], {"": [], "-novel": [], "-base": []}
        for image_id in sorted(ranks, key=str):
            caption, targets = self._targets[image_id]
            for t, r in zip(targets, ranks[image_id]):
                novel = None if self._novel_ids is None else bool(set(t["categories"]) & self._novel_ids)
                rows.append({"image_id": image_id, "caption": caption, "phrase": t["phrase"], "spans": t["spans"],
                             "boxes": t["boxes"], "categories": t["categories"], "novel": novel, "rank": r})
                groups[""].append(r)
                if novel is not None:
                    groups["-novel" if novel else "-base"].append(r)
        res = {}
        for suffix, rs in groups.items():
            if not rs and suffix:
                continue
            rec = recall_from_ranks(rs, self.ks)
            res.update({f"{k}{suffix}": v for k, v in rec.items()})
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "grounding_phrases.json"), "w") as f:
                json.dump(rows, f)
        return {"grounding": res}
