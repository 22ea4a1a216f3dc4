"""The open-vocabulary box predictor: region features scored against text embeddings.

``logits = [cos(x, W_1) .. cos(x, W_C), cos(x, 0)] / T`` where ``cos(x, 0) = 0`` (the
all-zero background embedding, appended last) and ``T = CLSS_TEMP`` (0.01). Box
regression is class-agnostic. The classifier (``cls_score``) and its vocabularies are in
``vocabulary.py``: embeddings are buffers, not weights, set from config or at run time
(the detector's ``set_vocabulary``) and never read from a weight file.
"""
import logging
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.roi_heads.fast_rcnn import (  # _log_classification_stats: private, used once in losses
    FastRCNNOutputLayers,
    _log_classification_stats,
)

from ..ensemble import ensemble_probs
from .postprocess import fast_inference
from .vocabulary import NoVocabularyError, TextEmbeddingClassifier, Vocabulary

__all__ = ["OpenVocabularyPredictor", "NoVocabularyError"]

logger = logging.getLogger(__name__)


class OpenVocabularyPredictor(FastRCNNOutputLayers):
    """FastRCNNOutputLayers whose ``cls_score`` is a :class:`TextEmbeddingClassifier`: region
    embeddings scored against a frozen text-embedding vocabulary (the training or the test
    one) with an all-zero background embedding. Box regression is class-agnostic.

    Args (besides FastRCNNOutputLayers'):
        embed_dim: D, the dimension of region embeddings and text embeddings.
        temperature: logits are cosine similarities divided by this.
        bg_loss_weight: weight of the background class in the classification loss.
        focal_gamma: focal scaling ``(1 - p_t)^gamma`` of the cross entropy (0 = plain CE).
        no_box_delta: at inference, boxes are the regions themselves (no deltas).
        fusion: ``"none"`` | ``"geometric"`` (``sqrt(sigmoid(objectness) * p)``) |
            ``"legacy"`` (official: ``sqrt(objectness_logit * p)``; regions with a
            negative logit give NaN and are dropped).
        only_fg: train the classifier on foreground regions only.
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, embed_dim: int, temperature: float = 0.01,
                 bg_loss_weight: float = 1.0, focal_gamma: float = 0.0, no_box_delta: bool = False,
                 fusion: str = "none", only_fg: bool = False, **kwargs):
        kwargs["cls_agnostic_bbox_reg"] = True
        # the number of classes is the active vocabulary's (set later, changeable at run time); the
        # parent's one-class linear classifier is replaced below (built as before, so that seeded
        # random initialisations of the whole detector stay what they were)
        super().__init__(input_shape, num_classes=1, **kwargs)
        self.cls_score = TextEmbeddingClassifier(embed_dim, temperature)
        in_dim = input_shape.channels * (input_shape.width or 1) * (input_shape.height or 1)
        # a learned projection only when region features are not already in the joint space
        self.projection = nn.Linear(in_dim, embed_dim) if in_dim != embed_dim else None
        self.embed_dim = embed_dim
        self.bg_loss_weight = bg_loss_weight
        self.focal_gamma = focal_gamma
        self.no_box_delta = no_box_delta
        if fusion not in ("none", "geometric", "legacy"):
            raise ValueError(f"unknown score fusion {fusion!r}")
        self.fusion = fusion
        self.only_fg = only_fg

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.pop("num_classes", None)
        ret.pop("cls_agnostic_bbox_reg", None)
        c = cfg.MODEL.CLIP
        if c.MULTIPLY_RPN_SCORE_LEGACY:
            fusion = "legacy"
        elif c.MULTIPLY_RPN_SCORE:
            fusion = "geometric"
        else:
            fusion = "none"
        ret.update(embed_dim=c.TEXT_EMB_DIM, temperature=c.CLSS_TEMP, bg_loss_weight=c.BG_CLS_LOSS_WEIGHT,
                   focal_gamma=c.FOCAL_SCALED_LOSS, no_box_delta=c.NO_BOX_DELTA, fusion=fusion,
                   only_fg=c.ONLY_SAMPLE_FG_PROPOSALS)
        return ret

    # ---- vocabulary ----
    @property
    def train_vocabulary(self) -> Vocabulary:
        return self.cls_score.train_vocabulary

    @property
    def test_vocabulary(self) -> Vocabulary:
        return self.cls_score.test_vocabulary

    @property
    def num_classes(self) -> int:
        """Classes of the active vocabulary (the parent's attribute, now derived)."""
        return self.cls_score.num_classes()

    @num_classes.setter
    def num_classes(self, value):  # FastRCNNOutputLayers.__init__ assigns it; the vocabulary decides
        pass

    @property
    def temperature(self) -> float:
        return self.cls_score.temperature

    @property
    def class_names(self) -> Optional[List[str]]:
        """Names of the active vocabulary (None when it was given as a bare tensor)."""
        return self.cls_score.active().names

    # ---- forward ----
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Region features (``[R, D]`` or ``[R, C, H, W]`` from a box head) -> ``[R, D]``
        embeddings in the text space (not normalised): the learned projection where the
        features are not already there (FPN), else the features themselves (C4)."""
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        return self.projection(x) if self.projection is not None else x

    def classify(self, emb: torch.Tensor) -> torch.Tensor:
        """``[R, D]`` embeddings -> ``[R, C+1]`` logits against the active vocabulary."""
        return self.cls_score(emb)

    def forward(self, x: torch.Tensor, counts=None):
        """``[R, D]`` region features -> (``[R, C+1]`` logits, ``[R, 4]`` deltas). ``counts``
        (regions per image) is for predictors that relate an image's regions (grounding)."""
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        self.cls_score.embeddings()  # fail before any work when there is no vocabulary
        deltas = self.bbox_pred(x).float()
        return self.cls_score(self.embed(x)), deltas

    # ---- training ----
    def losses(self, predictions, proposals):
        scores, deltas = predictions
        gt_classes = cat([p.gt_classes for p in proposals], dim=0) if len(proposals) else torch.empty(0)
        _log_classification_stats(scores, gt_classes)
        if len(proposals):
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            gt_boxes = cat([(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor
                            for p in proposals], dim=0)
        else:
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=deltas.device)
        return {
            "loss_cls": self.classification_loss(scores, gt_classes),
            "loss_box_reg": self.box_reg_loss(proposal_boxes, gt_boxes, deltas, gt_classes),
        }

    def classification_loss(self, logits: torch.Tensor, gt_classes: torch.Tensor) -> torch.Tensor:
        """Cross entropy with a background weight and optional focal scaling:
        ``sum_i w_i (1 - p_t,i)^gamma CE_i / sum_i w_i`` (``w`` = 1, or ``bg_loss_weight``
        for background regions)."""
        if gt_classes.numel() == 0:
            return logits.sum() * 0.0
        if self.only_fg:
            keep = gt_classes < logits.shape[1] - 1
            if not keep.any():
                return logits.sum() * 0.0
            logits, gt_classes = logits[keep], gt_classes[keep]
        ce = F.cross_entropy(logits, gt_classes, reduction="none")
        if self.focal_gamma > 0:
            p_t = torch.exp(-ce)
            # clamped: for gamma < 1 the derivative of (1 - p_t)^gamma is infinite at p_t = 1,
            # which the 0.01 temperature reaches in float32
            ce = (1.0 - p_t).clamp(min=1e-6) ** self.focal_gamma * ce
        w = torch.ones_like(ce)
        w[gt_classes == logits.shape[1] - 1] = self.bg_loss_weight
        return (w * ce).sum() / w.sum().clamp(min=1e-6)

    # ---- inference ----
    def predict_boxes(self, predictions, proposals):
        if self.no_box_delta:
            return [p.proposal_boxes.tensor for p in proposals]
        return super().predict_boxes(predictions, proposals)

    def predict_probs(self, predictions, proposals):
        scores, _ = predictions
        probs = F.softmax(scores, dim=-1)
        if len(proposals) and proposals[0].has("ensemble_probs"):  # MODEL.CLIP.ENSEMBLE_WEIGHTS (ensemble.py)
            probs = ensemble_probs(probs, cat([p.ensemble_probs for p in proposals]),
                                   cat([p.ensemble_shares for p in proposals]))
        if self.fusion != "none" and len(proposals) and proposals[0].has("objectness_logits"):
            obj = cat([p.objectness_logits for p in proposals]).float()[:, None]
            if self.fusion == "geometric":
                probs = torch.sqrt(torch.sigmoid(obj) * probs)
            else:  # legacy (official): NaN where the logit is negative; those rows are dropped
                probs = torch.sqrt(obj * probs)
        return probs.split([len(p) for p in proposals], dim=0)

    def inference(self, predictions, proposals):
        with torch.autocast(predictions[0].device.type, enabled=False):
            return self._inference(predictions, proposals)

    def _inference(self, predictions, proposals):
        boxes = [b.float() for b in self.predict_boxes(predictions, proposals)]
        scores = self.predict_probs(predictions, proposals)
        # rows with NaN / inf (legacy fusion) are removed before thresholding and NMS
        keep = [torch.isfinite(s).all(dim=1) & torch.isfinite(b).all(dim=1) for s, b in zip(scores, boxes)]
        boxes = [b[k] for b, k in zip(boxes, keep)]
        scores = [s[k] for s, k in zip(scores, keep)]
        image_shapes = [x.image_size for x in proposals]
        return fast_inference(boxes, scores, image_shapes, self.test_score_thresh,
                              self.test_nms_thresh, self.test_topk_per_image)
