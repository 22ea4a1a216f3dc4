"""Detection post-processing: score threshold, per-class NMS, top-k, as detectron2's
``fast_rcnn_inference``, with the NMS run only on as many of the best candidates as the
top-k needs.

With large vocabularies (LVIS, 1203 classes) most of the ``R x C`` scores pass the 0.001
threshold and per-class NMS over all of them dominates post-processing. Suppression only
ever comes from a higher-scoring box of the same class, so the NMS survivors among the
candidates with score >= s are exactly the survivors (in the whole set) with score >= s.
Candidates are therefore taken best-first, in growing prefixes closed under ties, until
the prefix holds ``topk`` survivors: the result equals NMS over everything (up to the
order among exactly equal scores, which detectron2 leaves undefined as well).
"""
from typing import List, Tuple

import torch

from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances


def nms_topk(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, nms_thresh: float,
             topk: int, first: int = 0) -> torch.Tensor:
    """``batched_nms(boxes, scores, classes, nms_thresh)[:topk]`` (indices, best first),
    computed on the fewest best-scoring candidates that suffice. ``topk < 0``: all."""
    n = scores.numel()
    if topk < 0 or n <= (first or 4 * max(topk, 256)):
        keep = batched_nms(boxes, scores, classes, nms_thresh)
        return keep if topk < 0 else keep[:topk]
    order = torch.sort(scores, descending=True, stable=True).indices
    k = first or 4 * max(topk, 256)
    while k < n:
        cut = scores[order[k - 1]]
        k = int((scores >= cut).sum())  # close the prefix under ties
        idx = order[:k]
        keep = batched_nms(boxes[idx], scores[idx], classes[idx], nms_thresh)
        if keep.numel() >= topk or k >= n:
            return idx[keep[:topk]]
        k *= 4
    return batched_nms(boxes, scores, classes, nms_thresh)[:topk]


def inference_single_image(boxes: torch.Tensor, scores: torch.Tensor, image_shape: Tuple[int, int],
                           score_thresh: float, nms_thresh: float, topk: int):
    """detectron2's ``fast_rcnn_inference_single_image`` (``boxes`` ``[R, 4 or 4C]``,
    ``scores`` ``[R, C + 1]`` with background last) with :func:`nms_topk`."""
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    if not valid.all():
        boxes, scores = boxes[valid], scores[valid]
    scores = scores[:, :-1]
    num_reg = boxes.shape[1] // 4
    b = Boxes(boxes.reshape(-1, 4))
    b.clip(image_shape)
    boxes = b.tensor.view(-1, num_reg, 4)
    mask = scores > score_thresh
    inds = mask.nonzero()
    boxes = boxes[inds[:, 0], 0] if num_reg == 1 else boxes[mask]
    scores = scores[mask]
    keep = nms_topk(boxes, scores, inds[:, 1], nms_thresh, topk)
    boxes, scores, inds = boxes[keep], scores[keep], inds[keep]
    result = Instances(image_shape)
    result.pred_boxes = Boxes(boxes)
    result.scores = scores
    result.pred_classes = inds[:, 1]
    return result, inds[:, 0]


def fast_inference(boxes: List[torch.Tensor], scores: List[torch.Tensor], image_shapes, score_thresh: float,
                   nms_thresh: float, topk: int):
    """Per-image :func:`inference_single_image`; returns (instances, kept region indices)."""
    out = [inference_single_image(b, s, shape, score_thresh, nms_thresh, topk)
           for b, s, shape in zip(boxes, scores, image_shapes)]
    return [x[0] for x in out], [x[1] for x in out]
