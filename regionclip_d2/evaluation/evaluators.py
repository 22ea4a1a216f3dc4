"""Evaluators for the open-vocabulary benchmarks.

COCO-format data sets: detectron2's COCOEvaluator with the official pycocotools code
(``use_fast_impl=False``), plus AP50 and AP over the novel, base and all classes when
the data set's metadata names its ``novel_classes`` (the OVR-CNN protocol: the mean of
per-class AP50 over each subset). LVIS: detectron2's LVISEvaluator (AP, APr, APc, APf).
"""
import logging
import os
import types

import numpy as np
from tabulate import tabulate

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, LVISEvaluator

logger = logging.getLogger(__name__)


def lvis_numpy_compat():
    """lvis 0.5.3 uses ``np.float``, removed in numpy 1.24. Give the lvis evaluation module
    (only it) a numpy namespace that still has the alias; numpy itself is untouched."""
    import lvis.eval as lvis_eval

    if hasattr(np, "float") or isinstance(lvis_eval.np, types.SimpleNamespace):
        return
    shim = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    shim.float = float
    shim.int = int
    shim.bool = bool
    lvis_eval.np = shim


def split_ap(precisions: np.ndarray, class_names, novel_classes):
    """Per-class AP50 and AP from COCOeval's precision array ``[T, R, K, A, M]``, averaged
    over the novel, base and all classes. Classes without ground truth are skipped."""
    novel = set(novel_classes)
    per_class = {}
    for k, name in enumerate(class_names):
        p50 = precisions[0, :, k, 0, -1]
        p = precisions[:, :, k, 0, -1]
        if (p50 > -1).any():
            per_class[name] = (float(np.mean(p50[p50 > -1]) * 100), float(np.mean(p[p > -1]) * 100))
    out = {}
    for split, members in (("novel", [n for n in per_class if n in novel]),
                           ("base", [n for n in per_class if n not in novel]),
                           ("all", list(per_class))):
        out[f"AP50-{split}"] = float(np.mean([per_class[n][0] for n in members])) if members else float("nan")
        out[f"AP-{split}"] = float(np.mean([per_class[n][1] for n in members])) if members else float("nan")
    return out, per_class


class RegionCLIPCOCOEvaluator(COCOEvaluator):
    """detectron2's COCOEvaluator that can leave images out of the metrics
    (:meth:`evaluate_without`, for images that could not be read)."""

    def evaluate_without(self, image_ids):
        """Evaluate on the data set's images except ``image_ids``: their ground truth is not
        counted (``COCOeval.params.imgIds``)."""
        excluded = set(image_ids)
        return self.evaluate(img_ids=[i for i in self._coco_api.getImgIds() if i not in excluded])


class RegionCLIPLVISEvaluator(LVISEvaluator):
    """detectron2's LVISEvaluator that can leave images out of the metrics
    (:meth:`evaluate_without`, for images that could not be read)."""

    def evaluate_without(self, image_ids):
        """Evaluate against the ground truth of the data set's images except ``image_ids``."""
        from lvis import LVIS

        excluded, full = set(image_ids), self._lvis_api
        subset = LVIS.__new__(LVIS)  # LVIS() reads a file; build the index from the filtered dict instead
        subset.logger = full.logger
        subset.dataset = dict(full.dataset, images=[im for im in full.dataset["images"] if im["id"] not in excluded],
                              annotations=[a for a in full.dataset["annotations"] if a["image_id"] not in excluded])
        subset._create_index()
        self._lvis_api = subset
        try:
            return self.evaluate()
        finally:
            self._lvis_api = full


class OVDCOCOEvaluator(RegionCLIPCOCOEvaluator):
    """COCOEvaluator that also reports novel / base / all AP50 (and AP)."""

    def __init__(self, dataset_name, novel_classes, **kwargs):
        super().__init__(dataset_name, **kwargs)
        self._novel_classes = list(novel_classes)

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names)
        if coco_eval is None or class_names is None:
            return results
        splits, _ = split_ap(coco_eval.eval["precision"], class_names, self._novel_classes)
        results.update(splits)
        table = [[s, f"{splits[f'AP50-{s}']:.2f}", f"{splits[f'AP-{s}']:.2f}"] for s in ("novel", "base", "all")]
        logger.info("Open-vocabulary %s results (mean of per-class AP over each split):\n%s", iou_type,
                    tabulate(table, headers=["classes", "AP50", "AP"], tablefmt="pipe"))
        return results


def build_evaluator(cfg, dataset_name, output_folder=None):
    """The evaluator for a registered data set, chosen by its ``evaluator_type`` metadata
    (``coco``, ``lvis``, or ``grounding``: phrase recall@1/5/10); COCO data sets with
    ``novel_classes`` get novel/base/all AP.
    Each can leave unreadable images out (``evaluate_without``, see
    :mod:`regionclip_d2.evaluation.unreadable`)."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    meta = MetadataCatalog.get(dataset_name)
    kind = getattr(meta, "evaluator_type", "coco")
    if kind == "lvis":
        lvis_numpy_compat()
        return RegionCLIPLVISEvaluator(dataset_name, output_dir=output_folder)
    if kind == "coco":
        novel = getattr(meta, "novel_classes", None)
        if novel is not None:
            return OVDCOCOEvaluator(dataset_name, novel, output_dir=output_folder, use_fast_impl=False)
        return RegionCLIPCOCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)
    if kind == "grounding":
        from .grounding_recall import GroundingEvaluator

        return GroundingEvaluator(dataset_name, output_dir=output_folder)
    raise ValueError(f"data set {dataset_name!r} has evaluator_type {kind!r}; regionclip_d2 evaluates "
                     "'coco', 'lvis' and 'grounding' data sets")
