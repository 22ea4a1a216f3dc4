"""Zero-shot region classification on ground-truth boxes (docs/method.md): the
top-1 accuracy of classifying each ground-truth box against a vocabulary, per class and
averaged over the novel, base and all classes."""
import logging
from collections import defaultdict
from typing import Callable, Dict, List, Sequence

import torch
from tqdm import tqdm

from detectron2.structures import pairwise_iou

from .unreadable import UNREADABLE, SkipUnreadableMapper, too_many_unreadable, unreadable_error

logger = logging.getLogger(__name__)


class _Unreadable:
    """Unreadable images of one evaluation: each logged as it is met; too many is an error."""

    def __init__(self, total: int, max_fraction: float, what: str):
        self.items, self.total, self.max_fraction, self.what = [], total, max_fraction, what

    def add(self, x) -> None:
        self.items.append({"file_name": str(x.get("file_name")), "image_id": x.get("image_id"),
                           "reason": x[UNREADABLE]})
        logger.warning("%s: CANNOT READ IMAGE %s (%s): it is excluded", self.what, x.get("file_name"),
                       x[UNREADABLE])
        if too_many_unreadable(len(self.items), self.total, self.max_fraction):
            raise unreadable_error(self.items, self.total, self.max_fraction, self.what)


@torch.no_grad()
def region_classification_accuracy(model, dataset_dicts: List[Dict], mapper, class_names: Sequence[str],
                                   novel_classes: Sequence[str] = (), progress: bool = True,
                                   max_unreadable_fraction: float = 0.05) -> Dict:
    """Classify every ground-truth box of ``dataset_dicts`` with a ``CLIPFastRCNN`` (C4 or
    FPN; the boxes are encoded by ``model.encode_boxes``).

    The model's vocabulary is set to ``class_names`` (the data set's classes, in its
    contiguous order); each box's prediction is the argmax over the classes (background
    excluded). Returns ``{"acc-novel", "acc-base", "acc-all"}`` (mean of per-class top-1
    accuracy, in %), ``"per_class"``, ``"boxes"`` and ``"unreadable_images"`` (how many images
    could not be read and were left out; more than ``max_unreadable_fraction`` of them, or
    all, is :class:`~regionclip_d2.evaluation.unreadable.UnreadableImagesError`).
    """
    model.eval()
    model.set_vocabulary(list(class_names))
    pred = model.roi_heads.box_predictor

    def classify(x):
        emb = model.encode_boxes([x], [x["instances"].gt_boxes])[0]
        return pred.classify(emb)[:, :-1].argmax(dim=1)

    return box_classification_accuracy({"model": classify}, dataset_dicts, mapper, class_names, novel_classes,
                                       progress, max_unreadable_fraction)["model"]


@torch.no_grad()
def box_classification_accuracy(classifiers: Dict[str, Callable[[Dict], torch.Tensor]], dataset_dicts: List[Dict],
                                mapper, class_names: Sequence[str], novel_classes: Sequence[str] = (),
                                progress: bool = True, max_unreadable_fraction: float = 0.05,
                                what: str = "region classification") -> Dict[str, Dict]:
    """Top-1 accuracy of classifying every ground-truth box, for several classifiers in one
    pass over the data: ``classifiers[key](x)`` takes a mapped input ``x`` (with
    ``x["instances"].gt_boxes``) and returns one class index per box (the data set's contiguous
    ids). Returns, per key, what :func:`region_classification_accuracy` returns."""
    correct = {k: defaultdict(int) for k in classifiers}
    total = defaultdict(int)
    mapper = SkipUnreadableMapper(mapper)
    unreadable = _Unreadable(len(dataset_dicts), max_unreadable_fraction, what)
    for d in tqdm(dataset_dicts, desc=what, unit="img", disable=not progress):
        x = mapper(d)
        if UNREADABLE in x:
            unreadable.add(x)
            continue
        if "instances" not in x or len(x["instances"]) == 0:
            continue
        truth = x["instances"].gt_classes.tolist()
        for t in truth:
            total[t] += 1
        for key, classify in classifiers.items():
            for g, t in zip(classify(x).cpu().tolist(), truth):
                correct[key][t] += int(g == t)
    novel = set(novel_classes)
    results = {}
    for key in classifiers:
        per_class = {class_names[c]: 100.0 * correct[key][c] / total[c] for c in total}
        out = {"per_class": per_class, "boxes": int(sum(total.values())), "unreadable_images": len(unreadable.items)}
        for split, names in (("novel", [n for n in per_class if n in novel]),
                             ("base", [n for n in per_class if n not in novel]), ("all", list(per_class))):
            out[f"acc-{split}"] = sum(per_class[n] for n in names) / len(names) if names else float("nan")
        results[key] = out
    return results


@torch.no_grad()
def dense_region_accuracy(model, dataset_dicts: List[Dict], mapper, text_embeddings: torch.Tensor,
                          class_names: Sequence[str], novel_classes: Sequence[str] = (), progress: bool = True,
                          max_unreadable_fraction: float = 0.05) -> Dict[str, Dict]:
    """CLIPSelf's region classification (the paper's Table 1): every ground-truth box classified
    against ``text_embeddings`` ``[C, D]`` (one row per class of ``class_names``) by the cosine
    with two embeddings of a ``CLIPSelf`` model (``model.encode_boxes``): ``"dense"``, the
    student's dense map RoI-pooled over the box; ``"crop"``, the teacher's image embedding of the
    box's crop. Returns ``{"dense": ..., "crop": ...}`` as :func:`region_classification_accuracy`;
    ``"dense"`` also holds ``"cosine_to_crop"``, the mean over boxes of ``cos(dense, crop)`` (what
    CLIPSelf's loss raises on its training regions)."""
    if text_embeddings.shape[0] != len(class_names):
        raise ValueError(f"{text_embeddings.shape[0]} text embeddings for {len(class_names)} classes: embed the "
                         "data set's classes in its order (tools/embed_vocabulary.py)")
    model.eval()
    text = torch.nn.functional.normalize(text_embeddings.float(), dim=-1).to(model.device)

    cosines, crops = [], []

    def classify(emb):
        if emb.shape[1] != text.shape[1]:
            raise ValueError(f"text embeddings have dim {text.shape[1]} but the ViT embeds regions in "
                             f"{emb.shape[1]}: embed the classes with the same CLIP model")
        return (emb @ text.t()).argmax(dim=1)

    def dense(x):  # called first for each input (dict order): embeds both, keeps the crop's for "crop"
        boxes = [x["instances"].gt_boxes]
        s, t = model.encode_boxes([x], boxes)[0], model.encode_boxes([x], boxes, teacher=True)[0]
        cosines.append((s * t).sum(dim=-1))
        crops.append(t)
        return classify(s)

    out = box_classification_accuracy({"dense": dense, "crop": lambda x: classify(crops.pop())}, dataset_dicts,
                                      mapper, class_names, novel_classes, progress, max_unreadable_fraction,
                                      what="dense region classification")
    out["dense"]["cosine_to_crop"] = float(torch.cat(cosines).mean()) if cosines else float("nan")
    return out


@torch.no_grad()
def pseudo_label_accuracy(model, dataset_dicts: List[Dict], mapper, concept_names: Sequence[str],
                          class_names: Sequence[str], novel_classes: Sequence[str] = (),
                          iou_threshold: float = 0.5, max_unreadable_fraction: float = 0.05) -> Dict:
    """How often a ``PretrainFastRCNN`` teacher's pseudo label names the object a region shows.

    For every region the model samples (its RPN, grid or random regions) that overlaps a
    ground-truth box with IoU >= ``iou_threshold``, the pseudo label (the teacher's best
    concept) is correct when the concept's head noun (its last word: "red star" -> "star")
    is the class name of the best-overlapping box. ``mapper`` must keep the annotations
    (``build_test_mapper`` of a GT-mode config).

    Returns ``{"accuracy", "accuracy-base", "accuracy-novel"}`` (%, over regions),
    ``"regions"`` (how many were judged), ``"per_class"`` and ``"unreadable_images"`` (left
    out, as in :func:`region_classification_accuracy`).
    """
    model.eval()
    novel = set(novel_classes)
    correct, total = defaultdict(int), defaultdict(int)
    mapper = SkipUnreadableMapper(mapper)
    unreadable = _Unreadable(len(dataset_dicts), max_unreadable_fraction, "pseudo-label accuracy")
    for d in dataset_dicts:
        x = mapper(d)
        if UNREADABLE in x:
            unreadable.add(x)
            continue
        if "instances" not in x or len(x["instances"]) == 0:
            continue
        out = model([x])[0]
        iou = pairwise_iou(out["regions"], x["instances"].gt_boxes.to(out["regions"].device))
        best, idx = iou.max(dim=1)
        for r in (best >= iou_threshold).nonzero().flatten().tolist():
            name = class_names[int(x["instances"].gt_classes[idx[r]])]
            concept = concept_names[int(out["pseudo_labels"][r])]
            total[name] += 1
            correct[name] += int(concept.split()[-1] == name)

    def rate(names):
        n = sum(total[c] for c in names)
        return 100.0 * sum(correct[c] for c in names) / n if n else float("nan")

    return {"accuracy": rate(list(total)), "accuracy-base": rate([c for c in total if c not in novel]),
            "accuracy-novel": rate([c for c in total if c in novel]), "regions": int(sum(total.values())),
            "per_class": {c: 100.0 * correct[c] / total[c] for c in total}, "unreadable_images": len(unreadable.items)}
