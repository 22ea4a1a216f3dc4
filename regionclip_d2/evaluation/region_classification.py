"""Zero-shot region classification on ground-truth boxes (METHOD.md section 1): the
top-1 accuracy of classifying each ground-truth box against a vocabulary, per class and
averaged over the novel, base and all classes."""
from collections import defaultdict
from typing import Dict, List, Sequence

import torch
from tqdm import tqdm

from detectron2.structures import Boxes


@torch.no_grad()
def region_classification_accuracy(model, dataset_dicts: List[Dict], mapper, class_names: Sequence[str],
                                   novel_classes: Sequence[str] = (), progress: bool = True) -> Dict:
    """Classify every ground-truth box of ``dataset_dicts`` with a ``CLIPFastRCNN``.

    The model's vocabulary is set to ``class_names`` (the data set's classes, in its
    contiguous order); each box's prediction is the argmax over the classes (background
    excluded). Returns ``{"acc-novel", "acc-base", "acc-all"}`` (mean of per-class top-1
    accuracy, in %), ``"per_class"`` and ``"boxes"``.
    """
    model.eval()
    model.set_vocabulary(list(class_names))
    pred = model.roi_heads.box_predictor
    correct, total = defaultdict(int), defaultdict(int)
    for d in tqdm(dataset_dicts, desc="region classification", unit="img", disable=not progress):
        x = mapper(d)
        if x is None or "instances" not in x or len(x["instances"]) == 0:
            continue
        images = model.preprocess_image([x])
        features = model.backbone(images.tensor)
        boxes = [Boxes(x["instances"].gt_boxes.tensor.to(model.device))]
        feats = model.roi_heads.region_features(features, boxes, model.region_encoder())
        logits, _ = pred(feats)
        guess = logits[:, :-1].argmax(dim=1).cpu()
        for g, t in zip(guess.tolist(), x["instances"].gt_classes.tolist()):
            total[t] += 1
            correct[t] += int(g == t)
    per_class = {class_names[c]: 100.0 * correct[c] / total[c] for c in total}
    novel = set(novel_classes)
    out = {"per_class": per_class, "boxes": int(sum(total.values()))}
    for split, names in (("novel", [n for n in per_class if n in novel]),
                         ("base", [n for n in per_class if n not in novel]), ("all", list(per_class))):
        out[f"acc-{split}"] = sum(per_class[n] for n in names) / len(names) if names else float("nan")
    return out
