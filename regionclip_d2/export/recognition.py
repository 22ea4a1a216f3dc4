"""The recognition branch as one plain module, with the vocabulary folded into its weights.

``RecognitionGraph`` computes what :class:`CLIPFastRCNN` computes for given boxes (GT mode):
image -> CLIP normalisation and padding -> backbone -> RoIAlign (one level for C4; for FPN
every box on the level detectron2's ROIPooler assigns it) -> region encoder (C4: res5 +
attention pool; FPN: box head + projection) -> box deltas applied to the regions (unless
``NO_BOX_DELTA``) and L2-normalised region embeddings -> a fixed
linear classifier whose rows are the L2-normalised text embeddings divided by the
temperature (YOLO-World's re-parameterisation: once the vocabulary is fixed the classifier is
a constant matrix) -> the all-zero background column -> softmax.

It holds no Python-side state that depends on the input (no vocabulary lookups, no thread
pools, no Instances), so ``torch.onnx.export`` and ``torch.jit.trace`` take it as it is.
Thresholds, per-class NMS and the rescaling of boxes to the original image stay outside
(:func:`detections` does them as the detector does).
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.structures import Boxes

__all__ = ["RecognitionGraph", "MIN_SIDE", "detections"]

# the backbone's total stride: smaller images are padded to it inside the detector; the graph
# asks for images at least this large instead (a shape-dependent branch does not export), and
# larger than its coarsest feature stride (a 1-cell level would broadcast where export cannot
# prove it does not): see RecognitionGraph.min_side
MIN_SIDE = 32


def _roi_align_params(level) -> Tuple[Tuple[int, int], float, int, bool]:
    inner = getattr(level, "inner", level)  # ThreadedROIAlign wraps detectron2's ROIAlign
    for name in ("output_size", "spatial_scale", "sampling_ratio", "aligned"):
        if not hasattr(inner, name):
            raise ValueError(f"the box pooler's level {inner!r} is not RoIAlign: export supports ROIAlignV2 "
                             "(MODEL.ROI_BOX_HEAD.POOLER_TYPE ROIAlignV2), the official setting")
    size = inner.output_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return size, float(inner.spatial_scale), int(inner.sampling_ratio), bool(inner.aligned)


class RecognitionGraph(nn.Module):
    """``(image, boxes) -> (scores, boxes, embeddings)`` for one image, the vocabulary folded in.

    Args:
        model: a built :class:`CLIPFastRCNN` (C4 or FPN) in eval mode, weights loaded.
        vocabulary: ``[C, D]`` text embeddings (any scale; normalised here).
        names: the C class names, kept as ``class_names`` for whoever saves the graph.
        logit_affine: ``[C, 2]`` per-class (scale, bias) of the cosines (calibrated exemplar
            classes, ``Detector.logit_affine``), folded into the classifier's rows and bias.

    Forward inputs:
        image: ``[3, H, W]`` RGB, uint8 or float in 0..255 units, already resized as the
            detector's input (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``), H and W >= ``min_side``
            (32 for C4, 65 for FPN with its stride-64 level).
        boxes: ``[N, 4]`` float32 XYXY in that image's pixels.
    Outputs:
        scores: ``[N, C + 1]`` class probabilities, the background last (as
            ``OpenVocabularyPredictor.predict_probs`` gives them for given regions; the RPN
            mode's fusion with objectness is not part of the graph).
        boxes: ``[N, 4]`` (class-agnostic regression) or ``[N, 4 C]``: the regions refined by
            the predictor's box deltas, or the input boxes with ``MODEL.CLIP.NO_BOX_DELTA``.
        embeddings: ``[N, D]`` L2-normalised region embeddings in the text space.
    """

    def __init__(self, model, vocabulary: torch.Tensor, names: Optional[Sequence[str]] = None,
                 logit_affine: Optional[torch.Tensor] = None):
        super().__init__()
        from ..grounding.predictor import GroundingPredictor

        heads, pred = model.roi_heads, model.roi_heads.box_predictor
        if isinstance(pred, GroundingPredictor) or not hasattr(getattr(pred, "cls_score", None), "temperature"):
            raise ValueError(f"{type(pred).__name__} is not the open-vocabulary predictor: export folds a text-"
                             "embedding classifier (the grounding head, MODEL.GROUNDING.ENABLED, is not supported)")
        if getattr(model, "ensemble", None) is not None:
            raise ValueError("the detector ensembles its scores with a frozen model (MODEL.CLIP.ENSEMBLE_WEIGHTS), "
                             "which the exported graph does not include: export without MODEL.CLIP.ENSEMBLE_WEIGHTS")
        if model.inference_dtype != "float32":
            raise ValueError(f"MODEL.CLIP.INFERENCE_DTYPE is {model.inference_dtype}: export runs in float32; "
                             "set MODEL.CLIP.INFERENCE_DTYPE float32")
        vocabulary = torch.as_tensor(vocabulary, dtype=torch.float32)
        if vocabulary.dim() != 2 or vocabulary.shape[0] == 0:
            raise ValueError(f"vocabulary of shape {tuple(vocabulary.shape)}: expected [C, D] with C >= 1")
        if vocabulary.shape[1] != model.embed_dim:
            raise ValueError(f"text embeddings have dim {vocabulary.shape[1]} but the detector produces "
                             f"{model.embed_dim}: use embeddings from the detector's CLIP model")
        if names is not None and len(names) != vocabulary.shape[0]:
            raise ValueError(f"{len(names)} names for {vocabulary.shape[0]} embeddings")
        self.class_names = list(names) if names is not None else None
        self.backbone = model.backbone
        if hasattr(heads, "region_encoder"):  # C4: res4 RoIAlign -> res5 + attention pool (the backbone's)
            self.in_features = list(heads.in_features)
            pooler, self.box_head, self.c4 = heads.pooler, None, True
        else:  # FPN: multi-level RoIAlign -> box head -> projection
            self.in_features = list(heads.box_in_features)
            pooler, self.box_head, self.c4 = heads.box_pooler, heads.box_head, False
        self.levels = [_roi_align_params(level) for level in pooler.level_poolers]
        self.min_level, self.max_level = int(pooler.min_level), int(pooler.max_level)
        self.canonical_box_size, self.canonical_level = float(pooler.canonical_box_size), int(pooler.canonical_level)
        self.projection = pred.projection
        # box regression as the predictor applies it (none with MODEL.CLIP.NO_BOX_DELTA)
        self.bbox_pred = None if pred.no_box_delta else pred.bbox_pred
        self.box2box_transform = pred.box2box_transform
        self.register_buffer("pixel_mean", model.pixel_mean.detach().float().clone().view(-1, 1, 1), False)
        self.register_buffer("pixel_std", model.pixel_std.detach().float().clone().view(-1, 1, 1), False)
        self.div_pixel = bool(model.div_pixel)
        self.size_divisibility = int(self.backbone.size_divisibility)
        coarsest = max(int(s.stride) for s in self.backbone.output_shape().values())
        self.min_side = max(MIN_SIDE, coarsest + 1)
        # the folded classifier: rows = normalised text embeddings * scale / temperature, bias / temperature
        scale, bias = torch.ones(vocabulary.shape[0]), torch.zeros(vocabulary.shape[0])
        if logit_affine is not None:
            affine = torch.as_tensor(logit_affine, dtype=torch.float32)
            if affine.shape != (vocabulary.shape[0], 2):
                raise ValueError(f"logit_affine of shape {tuple(affine.shape)}: expected [{vocabulary.shape[0]}, 2]")
            scale, bias = affine[:, 0], affine[:, 1]
        t = float(pred.temperature)
        self.register_buffer("classifier", F.normalize(vocabulary, dim=-1) * (scale / t)[:, None], False)
        self.register_buffer("classifier_bias", bias / t, False)

    @property
    def num_classes(self) -> int:
        return int(self.classifier.shape[0])

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float()
        if self.div_pixel:
            x = x / 255.0
        x = ((x - self.pixel_mean) / self.pixel_std)[None]
        if self.size_divisibility > 1:  # zeros in normalised space, as ImageList.from_tensors pads
            d = self.size_divisibility
            h, w = x.shape[-2], x.shape[-1]
            # written as a multiple of d, so that torch.export can prove the FPN's levels line up
            x = F.pad(x, (0, (w + d - 1) // d * d - w, 0, (h + d - 1) // d * d - h))
        return x

    def pool(self, features: List[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        rois = torch.cat([boxes.new_zeros(boxes.shape[0], 1), boxes], dim=1)
        if len(self.levels) == 1:
            size, scale, ratio, aligned = self.levels[0]
            return torchvision.ops.roi_align(features[0], rois, size, scale, ratio, aligned)
        # every box on every level, then each box's own level kept: the values of ROIPooler's
        level = assign_boxes_to_levels([Boxes(boxes)], self.min_level, self.max_level, self.canonical_box_size,
                                       self.canonical_level)
        out = None
        for i, ((size, scale, ratio, aligned), feat) in enumerate(zip(self.levels, features)):
            pooled = torchvision.ops.roi_align(feat, rois, size, scale, ratio, aligned)
            mask = (level == i).to(pooled.dtype).view(-1, 1, 1, 1)
            out = pooled * mask if out is None else out + pooled * mask
        return out

    def forward(self, image: torch.Tensor, boxes: torch.Tensor):
        boxes = boxes.float()
        features = self.backbone(self.normalize(image))
        pooled = self.pool([features[f] for f in self.in_features], boxes)
        if self.c4:
            x = self.backbone.encode_pooled_regions(pooled)
        else:
            x = torch.flatten(self.box_head(pooled), start_dim=1)
        refined = boxes if self.bbox_pred is None else \
            self.box2box_transform.apply_deltas(self.bbox_pred(x).float(), boxes)
        if self.projection is not None:
            x = self.projection(x)
        emb = F.normalize(x.float(), dim=-1)
        logits = emb @ self.classifier.t() + self.classifier_bias
        logits = torch.cat([logits, logits.new_zeros(logits.shape[0], 1)], dim=1)  # cos(x, 0) := 0
        return F.softmax(logits, dim=-1), refined, emb


def detections(scores: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int],
                  output_size: Optional[Tuple[int, int]] = None, score_thresh: float = 0.001,
                  nms_thresh: float = 0.5, topk: int = 100):
    """Detections from the graph's ``scores`` and (refined) ``boxes``, as the detector makes them
    for given regions: the threshold, per-class NMS and top-k of its post-processing, then boxes
    rescaled from ``image_size`` (the graph's input, ``(H, W)``) to ``output_size`` (the
    original image's ``(H, W)``). Returns detectron2 ``Instances``."""
    from detectron2.modeling.postprocessing import detector_postprocess

    from ..modeling.roi_heads.postprocess import inference_single_image

    scores = torch.as_tensor(scores, dtype=torch.float32)
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    boxes = boxes.reshape(-1, 4) if boxes.dim() != 2 else boxes
    inst, _ = inference_single_image(boxes, scores, tuple(image_size), score_thresh, nms_thresh, topk)
    if output_size is None:
        return inst
    return detector_postprocess(inst, output_size[0], output_size[1])
