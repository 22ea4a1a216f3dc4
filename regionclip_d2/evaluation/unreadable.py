"""Evaluation that does not stop on one bad image.

An image that cannot be read (missing, truncated, undecodable, a mode that cannot become
RGB, a size that matches neither its annotation nor, for an EXIF-rotated image, the
annotation's transpose) is excluded from the evaluation:

* the test mapper is wrapped (:class:`SkipUnreadableMapper`): where it raises, it returns a
  placeholder that names the file and the reason instead of an image;
* the model is wrapped (:class:`SkipUnreadableModel`) so that placeholders never reach it;
* the evaluator is wrapped (:class:`UnreadableImageGuard`): each excluded file is logged with
  a warning as it is met; at the end a summary ("N of M images could not be read and are
  excluded: ... AP is over the M-N images read") is logged, the ground truth of the excluded
  images is left out of the metrics (COCO: ``COCOeval.params.imgIds``; LVIS: the ground
  truth restricted to the images read), and the results get an ``images`` entry
  ``{"total": M, "evaluated": M-N, "unreadable": N}``.

Evaluation stops with :class:`UnreadableImagesError` (naming the files and the fix) when
every image fails, or when more than ``max(TEST.MAX_UNREADABLE_FRACTION * M, 1)`` do (as
soon as one process alone has seen that many): a benchmark number over a small part of its
images would not be the benchmark's number, and a wrong image folder fails every image.
"""
import itertools
import logging
from typing import Dict, List, Optional, Sequence

import torch

import detectron2.utils.comm as comm
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset

logger = logging.getLogger(__name__)

UNREADABLE = "unreadable_image"  # key of the reason in a placeholder input
_BAR = "!" * 78


class UnreadableImagesError(RuntimeError):
    """Too many images of an evaluation data set could not be read (or all of them)."""


class SkipUnreadableMapper:
    """``mapper(d)`` where it works; where it raises (or returns ``None``) a placeholder
    ``{"file_name", "image_id", "unreadable_image": reason}`` (a test loader must yield one
    item per image: detectron2's ``MapDataset`` would replace a ``None`` by a random other image)."""

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, d):
        try:
            out = self.mapper(d)
            reason = "the mapper returned None"
        except Exception as e:  # noqa: BLE001  any failure of one image: decode, mode, size, annotations
            out, reason = None, f"{type(e).__name__}: {e}"
        if out is not None:
            return out
        return {"file_name": d.get("file_name"), "image_id": d.get("image_id"), UNREADABLE: reason}


class SkipUnreadableModel(torch.nn.Module):
    """Runs ``model`` on the readable inputs of a batch; placeholders get ``{}``."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.train(model.training)

    def forward(self, inputs):
        readable = [x for x in inputs if UNREADABLE not in x]
        outputs = iter(self.model(readable) if readable else ())
        return [{} if UNREADABLE in x else next(outputs) for x in inputs]


def too_many_unreadable(n: int, total: int, max_fraction: float) -> bool:
    """Every image failed, or more than ``max(max_fraction * total, 1)`` did."""
    return n > 0 and (n >= total or n > max(max_fraction * total, 1))


def _listing(items: Sequence[dict], limit: int = 10) -> str:
    shown = "; ".join(f"{x['file_name']} ({x['reason']})" for x in items[:limit])
    return shown + (f"; ... and {len(items) - limit} more" if len(items) > limit else "")


def unreadable_error(items: Sequence[dict], total: int, max_fraction: float, dataset_name: str = "",
                     partial: bool = False) -> UnreadableImagesError:
    """The error for :func:`too_many_unreadable`: how many, which files, what to do."""
    what = f"evaluation of {dataset_name}" if dataset_name else "evaluation"
    n = len(items)
    if n >= total:
        return UnreadableImagesError(
            f"{what}: none of the {total} images could be read: {_listing(items)}. Check the image folder given "
            "with the annotation file (--register NAME=ANNOTATIONS.json:IMAGE_ROOT, or $DETECTRON2_DATASETS) and "
            "that the files are images")
    return UnreadableImagesError(
        f"{what}: {'at least ' if partial else ''}{n} of {total} images could not be read, more than "
        f"TEST.MAX_UNREADABLE_FRACTION={max_fraction} of them: {_listing(items)}. Fix or replace these files "
        "(or remove them from the annotation file), or raise TEST.MAX_UNREADABLE_FRACTION to evaluate on the "
        "images that can be read")


class UnreadableImageGuard(DatasetEvaluator):
    """Wraps an evaluator: placeholders of :class:`SkipUnreadableMapper` are logged, counted
    and kept from it; the metrics leave out their ground truth (see the module docstring).

    The inner evaluator leaves images out through ``evaluate_without(image_ids)`` (the
    evaluators of :func:`regionclip_d2.evaluation.build_evaluator` have it); another evaluator
    is evaluated as it is, with a warning that the excluded images' objects count as missed."""

    def __init__(self, evaluator: DatasetEvaluator, num_images: int, max_fraction: float = 0.05,
                 dataset_name: str = ""):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"TEST.MAX_UNREADABLE_FRACTION must be in [0, 1], got {max_fraction}")
        self.evaluator, self.num_images = evaluator, int(num_images)
        self.max_fraction, self.dataset_name = max_fraction, dataset_name
        self.unreadable: List[Dict] = []  # this process's
        self.all_unreadable: List[Dict] = []  # every process's, after evaluate()

    def reset(self):
        self.evaluator.reset()
        self.unreadable, self.all_unreadable = [], []

    def process(self, inputs, outputs):
        keep = []
        for x, y in zip(inputs, outputs):
            if UNREADABLE not in x:
                keep.append((x, y))
                continue
            item = {"file_name": str(x.get("file_name")), "image_id": x.get("image_id"), "reason": x[UNREADABLE]}
            self.unreadable.append(item)
            logger.warning("evaluation of %s: CANNOT READ IMAGE %s (%s): it is excluded from the evaluation "
                           "(%d so far in this process)", self.dataset_name, item["file_name"], item["reason"],
                           len(self.unreadable))
            if too_many_unreadable(len(self.unreadable), self.num_images, self.max_fraction):
                raise unreadable_error(self.unreadable, self.num_images, self.max_fraction, self.dataset_name,
                                       partial=len(self.unreadable) < self.num_images)
        if keep:
            self.evaluator.process([x for x, _ in keep], [y for _, y in keep])

    def evaluate(self):
        items = self.unreadable
        if comm.get_world_size() > 1:
            items = list(itertools.chain(*comm.all_gather(self.unreadable)))
        self.all_unreadable = items
        n, total = len(items), self.num_images
        if too_many_unreadable(n, total, self.max_fraction):
            raise unreadable_error(items, total, self.max_fraction, self.dataset_name)
        if not n:
            results = self.evaluator.evaluate()
        else:
            logger.warning("\n%s\n!! evaluation of %s: %d of %d images could not be read and are excluded: %s.\n"
                           "!! AP is over the %d images read, not over all %d.\n%s", _BAR, self.dataset_name, n,
                           total, _listing(items, limit=50), total - n, total, _BAR)
            excluded = {x["image_id"] for x in items}
            if hasattr(self.evaluator, "evaluate_without"):
                results = self.evaluator.evaluate_without(excluded)
            else:
                logger.warning("%s cannot leave images out: the objects of the %d excluded images count as missed",
                               type(self.evaluator).__name__, n)
                results = self.evaluator.evaluate()
        if results is None:  # not the main process
            return None
        results = dict(results)
        results["images"] = {"total": total, "evaluated": total - n, "unreadable": n}
        return results


def evaluate_skipping_unreadable(model, data_loader, evaluator: DatasetEvaluator, dataset_name: str = "",
                                 max_fraction: float = 0.05, num_images: Optional[int] = None):
    """detectron2's ``inference_on_dataset`` on a loader whose mapper is wrapped in
    :class:`SkipUnreadableMapper`, leaving unreadable images out (see the module docstring).
    Returns ``(results, unreadable)``: the evaluator's results with an ``images`` entry, and
    ``[{"file_name", "image_id", "reason"}, ...]`` of the images left out (every process's)."""
    guard = UnreadableImageGuard(evaluator, len(data_loader.dataset) if num_images is None else num_images,
                                 max_fraction, dataset_name)
    results = inference_on_dataset(SkipUnreadableModel(model), data_loader, guard)
    return results, guard.all_unreadable
