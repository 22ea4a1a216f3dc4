"""RoI heads of the CLIP detector.

C4 (``CLIPRes5ROIHeads``): RoIAlign v2 on res4 -> the backbone's res5 (``layer4``) ->
CLIP's attention pool -> the open-vocabulary predictor. res5 and the attention pool
belong to the backbone (as in the official checkpoints): the meta-architecture hands the
head that encoder once, at construction (``set_region_encoder``); it is not a submodule of
the head, so its weights keep their ``backbone.*`` keys.

FPN (``CLIPStandardROIHeads``): detectron2's multi-level RoIAlign and box head, then
the open-vocabulary predictor (a learned projection into the text space).
"""
from typing import Callable, Dict, List, Optional

import torch

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import ROIPooler, convert_boxes_to_pooler_format
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, ROIHeads, StandardROIHeads
from detectron2.structures import Boxes, Instances

from ..poolers import thread_roi_align
from .ov_predictor import OpenVocabularyPredictor


def build_box_predictor(cfg, input_shape: ShapeSpec) -> OpenVocabularyPredictor:
    """The open-vocabulary predictor, or with ``MODEL.GROUNDING.ENABLED`` the grounding head
    (regions scored against the prompt's tokens)."""
    if cfg.MODEL.GROUNDING.ENABLED:
        from ...grounding.predictor import GroundingPredictor

        return GroundingPredictor(cfg, input_shape)
    return OpenVocabularyPredictor(cfg, input_shape)


def encode_in_chunks(fn: Callable, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``fn`` over the first dimension of ``x`` in chunks of at most ``chunk`` (0 = all at once)."""
    if chunk <= 0 or x.shape[0] <= chunk:
        return fn(x)
    return torch.cat([fn(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)], dim=0)


@ROI_HEADS_REGISTRY.register()
class CLIPRes5ROIHeads(ROIHeads):
    """C4 RoI head: res4 RoIAlign -> res5 + attention pool -> text-embedding classifier."""

    @configurable
    def __init__(self, *, in_features: List[str], pooler: ROIPooler, box_predictor: OpenVocabularyPredictor,
                 region_chunk_size: int = 0, region_encoder: Optional[Callable] = None, **kwargs):
        super().__init__(**kwargs)
        self.in_features = in_features
        self.pooler = pooler
        self.box_predictor = box_predictor
        self.region_chunk_size = region_chunk_size
        self.region_encoder = region_encoder

    def set_region_encoder(self, region_encoder: Callable):
        """``[R, C, S, S]`` pooled res4 features -> ``[R, D]`` embeddings (the backbone's res5 +
        attention pool, e.g. ``CLIPResNet.encode_pooled_regions``)."""
        self.region_encoder = region_encoder

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = super().from_config(cfg)
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        if len(in_features) != 1:
            raise ValueError(f"CLIPRes5ROIHeads pools one feature map, got ROI_HEADS.IN_FEATURES={in_features}")
        res = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        ret.update(
            in_features=in_features,
            pooler=thread_roi_align(ROIPooler(output_size=(res, res),
                                              scales=(1.0 / input_shape[in_features[0]].stride,),
                                              sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
                                              pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE)),
            box_predictor=build_box_predictor(cfg, ShapeSpec(channels=cfg.MODEL.CLIP.TEXT_EMB_DIM)),
            region_chunk_size=cfg.MODEL.CLIP.REGION_CHUNK_SIZE,
        )
        return ret

    def _encoder(self) -> Callable:
        if self.region_encoder is None:
            raise ValueError("CLIPRes5ROIHeads has no region encoder: call set_region_encoder(backbone res5 + "
                             "attention pool) first (CLIPFastRCNN does this when it is built)")
        return self.region_encoder

    def region_features(self, features, boxes) -> torch.Tensor:
        """``[R, D]`` embeddings of the boxes (a list of Boxes, one per image). With
        ``region_chunk_size`` the regions are pooled and encoded a chunk at a time, so
        memory does not grow with the number of regions beyond the ``[R, D]`` output."""
        encoder = self._encoder()
        x = [features[f] for f in self.in_features]
        n = sum(len(b) for b in boxes)
        chunk = self.region_chunk_size
        if chunk <= 0 or n <= chunk or len(self.pooler.level_poolers) != 1:
            return encode_in_chunks(encoder, self.pooler(x, boxes), chunk)
        rois = convert_boxes_to_pooler_format(boxes)
        level = self.pooler.level_poolers[0]
        return torch.cat([encoder(level(x[0], rois[i:i + chunk])) for i in range(0, n, chunk)], dim=0)

    def encode_boxes(self, features, boxes) -> torch.Tensor:
        """``[R, D]`` text-space embeddings (not normalised) of ``boxes`` (a list of Boxes,
        one per image), exactly as the detector scores regions."""
        return self.box_predictor.embed(self.region_features(features, boxes))

    def forward(self, images, features, proposals: List[Instances], targets=None):
        if self.training:
            if targets is None:
                raise ValueError("training needs ground-truth instances")
            proposals = self.label_and_sample_proposals(proposals, targets)
        feats = self.region_features(features, [p.proposal_boxes for p in proposals])
        predictions = self.box_predictor(feats, [len(p) for p in proposals])
        if self.training:
            return [], self.box_predictor.losses(predictions, proposals)
        instances, _ = self.box_predictor.inference(predictions, proposals)
        return instances, {}


@ROI_HEADS_REGISTRY.register()
class CLIPStandardROIHeads(StandardROIHeads):
    """FPN RoI head: detectron2's box head, then the open-vocabulary predictor."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        thread_roi_align(ret["box_pooler"])
        ret["box_predictor"] = build_box_predictor(cfg, ret["box_head"].output_shape)
        return ret

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        """detectron2's box branch, with the regions per image passed to the predictor."""
        x = self.box_pooler([features[f] for f in self.box_in_features], [p.proposal_boxes for p in proposals])
        predictions = self.box_predictor(self.box_head(x), [len(p) for p in proposals])
        if not self.training:
            return self.box_predictor.inference(predictions, proposals)[0]
        losses = self.box_predictor.losses(predictions, proposals)
        if self.train_on_pred_boxes:  # as detectron2 does (after the losses: the proposals change in place)
            with torch.no_grad():
                pred = self.box_predictor.predict_boxes_for_gt_classes(predictions, proposals)
                for p, boxes in zip(proposals, pred):
                    p.proposal_boxes = Boxes(boxes)
        return losses

    def encode_boxes(self, features, boxes) -> torch.Tensor:
        """``[R, D]`` text-space embeddings (not normalised) of ``boxes`` (a list of Boxes,
        one per image): multi-level RoIAlign, the box head, the predictor's projection."""
        x = self.box_pooler([features[f] for f in self.box_in_features], boxes)
        return self.box_predictor.embed(self.box_head(x))
