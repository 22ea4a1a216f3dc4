"""Evaluators for the open-vocabulary benchmarks (detectron2's COCO and LVIS evaluators)."""
import os
import types

import numpy as np

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, LVISEvaluator


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


def build_evaluator(cfg, dataset_name, output_folder=None):
    """COCO-style AP (``use_fast_impl=False``: the C++ evaluator is not installed) or LVIS AP
    (APr/APc/APf), chosen by the data set's ``evaluator_type`` metadata."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    meta = MetadataCatalog.get(dataset_name)
    kind = getattr(meta, "evaluator_type", "coco")
    if kind == "lvis":
        lvis_numpy_compat()
        return LVISEvaluator(dataset_name, output_dir=output_folder)
    if kind == "coco":
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)
    raise ValueError(f"data set {dataset_name!r} has evaluator_type {kind!r}; regionclip_d2 evaluates "
                     "'coco' and 'lvis' data sets")
