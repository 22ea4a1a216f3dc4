"""RoI heads of the CLIP detector.

C4 (``CLIPRes5ROIHeads``): RoIAlign v2 on res4 -> the backbone's res5 (``layer4``) ->
CLIP's attention pool -> the open-vocabulary predictor. res5 and the attention pool
belong to the backbone (as in the official checkpoints) and are reached through the
``region_encoder`` callable passed by the meta-architecture.

FPN (``CLIPStandardROIHeads``): detectron2's multi-level RoIAlign and box head, then
the open-vocabulary predictor (a learned projection into the text space).
"""
from typing import Callable, Dict, List

import torch

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import ROIPooler, convert_boxes_to_pooler_format
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, ROIHeads, StandardROIHeads
from detectron2.structures import Instances

from ..poolers import thread_roi_align
from .ov_predictor import OpenVocabularyPredictor


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
                 region_chunk_size: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.in_features = in_features
        self.pooler = pooler
        self.box_predictor = box_predictor
        self.region_chunk_size = region_chunk_size

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
            box_predictor=OpenVocabularyPredictor(cfg, ShapeSpec(channels=cfg.MODEL.CLIP.TEXT_EMB_DIM)),
            region_chunk_size=cfg.MODEL.CLIP.REGION_CHUNK_SIZE,
        )
        return ret

    def region_features(self, features, boxes, region_encoder: Callable) -> torch.Tensor:
        """``[R, D]`` embeddings of the boxes (a list of Boxes, one per image). With
        ``region_chunk_size`` the regions are pooled and encoded a chunk at a time, so
        memory does not grow with the number of regions beyond the ``[R, D]`` output."""
        x = [features[f] for f in self.in_features]
        n = sum(len(b) for b in boxes)
        chunk = self.region_chunk_size
        if chunk <= 0 or n <= chunk or len(self.pooler.level_poolers) != 1:
            return encode_in_chunks(region_encoder, self.pooler(x, boxes), chunk)
        rois = convert_boxes_to_pooler_format(boxes)
        level = self.pooler.level_poolers[0]
        return torch.cat([region_encoder(level(x[0], rois[i:i + chunk])) for i in range(0, n, chunk)], dim=0)

    def encode_boxes(self, features, boxes, region_encoder: Callable = None) -> torch.Tensor:
        """``[R, D]`` text-space embeddings (not normalised) of ``boxes`` (a list of Boxes,
        one per image), exactly as the detector scores regions."""
        if region_encoder is None:
            raise ValueError("CLIPRes5ROIHeads needs region_encoder (the backbone's res5 + attention pool)")
        return self.box_predictor.embed(self.region_features(features, boxes, region_encoder))

    def forward(self, images, features, proposals: List[Instances], targets=None, *,
                region_encoder: Callable = None):
        if region_encoder is None:
            raise ValueError("CLIPRes5ROIHeads needs region_encoder (the backbone's res5 + attention pool)")
        if self.training:
            if targets is None:
                raise ValueError("training needs ground-truth instances")
            proposals = self.label_and_sample_proposals(proposals, targets)
        feats = self.region_features(features, [p.proposal_boxes for p in proposals], region_encoder)
        predictions = self.box_predictor(feats)
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
        ret["box_predictor"] = OpenVocabularyPredictor(cfg, ret["box_head"].output_shape)
        return ret

    def encode_boxes(self, features, boxes, region_encoder: Callable = None) -> torch.Tensor:
        """``[R, D]`` text-space embeddings (not normalised) of ``boxes`` (a list of Boxes,
        one per image): multi-level RoIAlign, the box head, the predictor's projection."""
        x = self.box_pooler([features[f] for f in self.box_in_features], boxes)
        return self.box_predictor.embed(self.box_head(x))

    def forward(self, images, features, proposals, targets=None, *, region_encoder=None):
        return super().forward(images, features, proposals, targets)


@ROI_HEADS_REGISTRY.register()
class PretrainRes5ROIHeads(torch.nn.Module):
    """RoI head of region-text pretraining: RoIAlign on the student's and the teacher's
    res4 maps (each with its own resolution), then each one's res5 + attention pool.
    Neither res5 is owned here: the encoders come from the backbones."""

    @configurable
    def __init__(self, *, in_features: List[str], pooler: ROIPooler, teacher_pooler: ROIPooler):
        super().__init__()
        self.in_features = in_features
        self.pooler = pooler
        self.teacher_pooler = teacher_pooler

    @classmethod
    def from_config(cls, cfg, input_shape):
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        scale = (1.0 / input_shape[in_features[0]].stride,)
        kw = dict(sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
                  pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE, scales=scale)
        res, t_res = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION, cfg.MODEL.CLIP.TEACHER_POOLER_RESOLUTION
        return dict(in_features=in_features, pooler=thread_roi_align(ROIPooler(output_size=(res, res), **kw)),
                    teacher_pooler=thread_roi_align(ROIPooler(output_size=(t_res, t_res), **kw)))

    def forward(self, features, boxes, region_encoder: Callable, teacher: bool = False) -> torch.Tensor:
        """Region embeddings ``[R, D]`` of ``boxes`` (list of Boxes) from ``features``."""
        pooler = self.teacher_pooler if teacher else self.pooler
        return region_encoder(pooler([features[f] for f in self.in_features], boxes))
