"""PretrainFastRCNN: region-text pretraining of RegionCLIP (docs/method.md, "Pretraining").

image + caption -> regions (the frozen RPN branch, a grid, or random boxes) -> teacher
region features (frozen CLIP) -> pseudo concept labels -> student region features ->
region-concept contrastive + distillation losses, and the whole image against its
caption (image-text contrastive).
"""
import logging
from typing import Dict, List

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage

from ...checkpoint.loading import load_clip_weights, load_rpn_weights
from ...config import check_config
from ..backbone.clip_resnet import clip_resnet_from_cfg
from ..losses import (
    CONTRASTIVE_FORMS,
    cosine_logits,
    image_text_contrastive_loss,
    pseudo_labels,
    region_concept_contrastive_loss,
    region_concept_distillation_loss,
)
from ..poolers import thread_roi_align
from ..text import build_language_encoder, load_text_embeddings
from .two_branch import TwoBranchModel, rpn_branch_from_config

logger = logging.getLogger(__name__)

PRETRAIN_REGION_TYPES = ("RPN", "GRID", "RANDOM")


def grid_boxes(h: int, w: int, rows: int, cols: int, device=None) -> torch.Tensor:
    """``[rows * cols, 4]`` XYXY boxes tiling an ``h x w`` image."""
    ys = torch.linspace(0, h, rows + 1, device=device)
    xs = torch.linspace(0, w, cols + 1, device=device)
    boxes = [[xs[j], ys[i], xs[j + 1], ys[i + 1]] for i in range(rows) for j in range(cols)]
    return torch.tensor(boxes, device=device, dtype=torch.float32)


def random_boxes(h: int, w: int, n: int, generator=None, min_frac: float = 0.1, device=None) -> torch.Tensor:
    """``[n, 4]`` random XYXY boxes inside the image, each side at least ``min_frac`` of the image's."""
    r = torch.rand(n, 4, generator=generator)
    bw = (min_frac + (1 - min_frac) * r[:, 0]) * w
    bh = (min_frac + (1 - min_frac) * r[:, 1]) * h
    x0 = r[:, 2] * (w - bw)
    y0 = r[:, 3] * (h - bh)
    return torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1).to(device)


class PretrainRegionPooler(nn.Module):
    """Region features for pretraining: RoIAlign on the student's and on the teacher's res4
    maps (each with its own output size), then that backbone's res5 + attention pool (the
    ``region_encoder`` passed in; neither res5 is owned here)."""

    @configurable
    def __init__(self, *, in_features: List[str], pooler: ROIPooler, teacher_pooler: ROIPooler):
        super().__init__()
        self.in_features = in_features
        self.pooler = pooler
        self.teacher_pooler = teacher_pooler

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        scale = (1.0 / input_shape[in_features[0]].stride,)
        kw = dict(sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
                  pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE, scales=scale)
        res, t_res = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION, cfg.MODEL.CLIP.TEACHER_POOLER_RESOLUTION
        return dict(in_features=in_features, pooler=thread_roi_align(ROIPooler(output_size=(res, res), **kw)),
                    teacher_pooler=thread_roi_align(ROIPooler(output_size=(t_res, t_res), **kw)))

    def forward(self, features, boxes: List[Boxes], region_encoder, teacher: bool = False) -> torch.Tensor:
        """``[R, D]`` region embeddings of ``boxes`` (one Boxes per image) from ``features``."""
        pooler = self.teacher_pooler if teacher else self.pooler
        return region_encoder(pooler([features[f] for f in self.in_features], boxes))


@META_ARCH_REGISTRY.register()
class PretrainFastRCNN(TwoBranchModel):
    """Student CLIP ResNet (``backbone``, trained), teacher CLIP ResNet (``teacher_backbone``,
    frozen), language encoder (``lang_encoder``, frozen), and the RPN branch
    (``offline_backbone`` + ``offline_proposal_generator``, frozen) for RPN regions.

    Inputs: dicts with ``image`` ([3, H, W], cfg.INPUT.FORMAT) and ``caption`` (str).
    Training returns the losses; eval mode returns per image the regions and the
    student's L2-normalised region embeddings.
    """

    @configurable
    def __init__(self, *, backbone, teacher_backbone, lang_encoder, region_pooler, offline_backbone=None,
                 offline_proposal_generator=None, region_type="RPN", concept_emb=None, teacher_concept_emb=None,
                 tau=0.01,
                 concept_threshold=0.1, num_rpn_regions=300, num_sample_regions=100, grid=(3, 3),
                 num_random_regions=100, image_text=True, gather=False, loss_weights=(1.0, 1.0, 1.0),
                 contrastive_form="official", legacy_padded_image_box=False,
                 pixel_mean, pixel_std, input_format="RGB", offline_pixel_mean=(103.53, 116.28, 123.675),
                 offline_pixel_std=(1.0, 1.0, 1.0), offline_input_format="BGR", rpn_weights_file: str = ""):
        super().__init__()
        if region_type not in PRETRAIN_REGION_TYPES:
            raise ValueError(f"MODEL.CLIP.CROP_REGION_TYPE={region_type!r} for pretraining: use one of "
                             f"{PRETRAIN_REGION_TYPES}")
        if region_type == "RPN" and offline_backbone is None:
            raise ValueError("RPN regions need the RPN branch: set MODEL.CLIP.OFFLINE_RPN_CONFIG")
        self.backbone = backbone
        self.teacher_backbone = teacher_backbone
        self.lang_encoder = lang_encoder
        self.region_type = region_type
        self.region_pooler = region_pooler
        self.register_buffer("concept_emb", torch.zeros(0, backbone.embed_dim), persistent=False)
        self.register_buffer("teacher_concept_emb", torch.zeros(0, teacher_backbone.embed_dim), persistent=False)
        self.tau = tau
        self.concept_threshold = concept_threshold
        self.num_rpn_regions = num_rpn_regions
        self.num_sample_regions = num_sample_regions
        self.grid = tuple(grid)
        self.num_random_regions = num_random_regions
        self.image_text = image_text
        self.gather = gather
        self.loss_weights = tuple(loss_weights)
        if contrastive_form not in CONTRASTIVE_FORMS:
            raise ValueError(f"MODEL.CLIP.PRETRAIN_CONTRASTIVE_FORM={contrastive_form!r}: use one of "
                             f"{CONTRASTIVE_FORMS}")
        self.contrastive_form = contrastive_form
        self.legacy_padded_image_box = legacy_padded_image_box
        self._init_two_branch(pixel_mean=pixel_mean, pixel_std=pixel_std, input_format=input_format,
                              offline_backbone=offline_backbone,
                              offline_proposal_generator=offline_proposal_generator,
                              offline_pixel_mean=offline_pixel_mean, offline_pixel_std=offline_pixel_std,
                              offline_input_format=offline_input_format, rpn_weights_file=rpn_weights_file)
        if concept_emb is not None:  # after _init_two_branch: the pool goes to the model's device
            self.set_concept_pool(concept_emb, teacher_concept_emb)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.CLIP
        check_config(cfg)
        backbone = build_backbone(cfg)
        teacher_name = c.TEACHER_OPENCLIP_MODEL
        teacher = clip_resnet_from_cfg(cfg, ["res4"], model_name=teacher_name or None, freeze_at=5)
        ret = dict(
            backbone=backbone, teacher_backbone=teacher,
            lang_encoder=build_language_encoder(c.OPENCLIP_MODEL, c.OPENCLIP_MODEL_CONFIG),
            region_pooler=PretrainRegionPooler(cfg, backbone.output_shape()),
            region_type=c.CROP_REGION_TYPE, tau=c.CLSS_TEMP,
            concept_threshold=c.CONCEPT_THRES, num_rpn_regions=c.PRETRAIN_RPN_REGIONS,
            num_sample_regions=c.PRETRAIN_SAMPLE_REGIONS, grid=c.GRID_REGIONS, num_random_regions=c.RANDOM_REGIONS,
            image_text=c.PRETRAIN_IMG_TXT_LEVEL, gather=c.GATHER_GPUS, loss_weights=c.PRETRAIN_LOSS_WEIGHTS,
            contrastive_form=c.PRETRAIN_CONTRASTIVE_FORM, legacy_padded_image_box=c.LEGACY_PADDED_IMAGE_BOX,
            pixel_mean=cfg.MODEL.PIXEL_MEAN, pixel_std=cfg.MODEL.PIXEL_STD, input_format=cfg.INPUT.FORMAT,
        )
        ret.update(rpn_branch_from_config(cfg, post_nms_topk_test=c.PRETRAIN_RPN_REGIONS))
        ret.update(load_pretrain_from_cfg(cfg, ret))
        return ret

    # ------------------------------------------------------------------ setup
    def set_concept_pool(self, concept_emb: torch.Tensor, teacher_concept_emb: torch.Tensor = None):
        """The concept pool: ``[M, D]`` student-side and ``[M, D_teacher]`` teacher-side
        text embeddings of the same M concepts (the same tensor when the dims agree)."""
        if teacher_concept_emb is None:
            teacher_concept_emb = concept_emb
        if concept_emb.shape[0] != teacher_concept_emb.shape[0]:
            raise ValueError(f"the student concept pool has {concept_emb.shape[0]} concepts but the teacher's has "
                             f"{teacher_concept_emb.shape[0]}: MODEL.CLIP.CONCEPT_POOL_EMB and "
                             "TEACHER_CONCEPT_POOL_EMB must embed the same concepts")
        for emb, bb, key in ((concept_emb, self.backbone, "MODEL.CLIP.CONCEPT_POOL_EMB"),
                             (teacher_concept_emb, self.teacher_backbone, "MODEL.CLIP.TEACHER_CONCEPT_POOL_EMB")):
            if emb.shape[1] != bb.embed_dim:
                raise ValueError(f"concept embeddings have dim {emb.shape[1]} but the CLIP model produces "
                                 f"{bb.embed_dim}: set {key} to embeddings from the same CLIP model")
        self.concept_emb = concept_emb.float().to(self.pixel_mean.device)
        self.teacher_concept_emb = teacher_concept_emb.float().to(self.pixel_mean.device)

    def frozen_modules(self) -> List[nn.Module]:
        """The teacher, the language encoder and the RPN branch (always frozen in pretraining)."""
        rpn = [self.offline_backbone, self.offline_proposal_generator] if self.has_rpn_branch else []
        return [m for m in (self.teacher_backbone, self.lang_encoder) if m is not None] + rpn

    # ------------------------------------------------------------------ regions
    @torch.no_grad()
    def get_regions(self, batched_inputs, image_sizes=None) -> List[Instances]:
        """The regions of each input (``proposal_boxes``): the RPN branch's top
        PRETRAIN_RPN_REGIONS, of which PRETRAIN_SAMPLE_REGIONS at random; a grid; or random
        boxes. ``image_sizes``: ``(h, w)`` per input (default: the images' own)."""
        if image_sizes is None:
            image_sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
        if self.region_type == "RPN":
            boxes = []
            for p in self.propose(batched_inputs)[0]:
                b = p.proposal_boxes[: self.num_rpn_regions]
                if len(b) > self.num_sample_regions:  # sample at random among the top regions
                    b = b[torch.randperm(len(b), device=b.tensor.device)[: self.num_sample_regions]]
                boxes.append(b)
        elif self.region_type == "GRID":
            boxes = [Boxes(grid_boxes(h, w, *self.grid, device=self.device)) for h, w in image_sizes]
        else:
            boxes = [Boxes(random_boxes(h, w, self.num_random_regions, device=self.device)) for h, w in image_sizes]
        regions = []
        for b, size in zip(boxes, image_sizes):
            r = Instances(tuple(size))
            r.proposal_boxes = b
            regions.append(r)
        return regions

    def image_box_sizes(self, images) -> List[tuple]:
        """``(h, w)`` of the whole-image box of each image for the image-text loss: the image
        itself, or (``legacy_padded_image_box``, the official behaviour) the whole padded batch
        tensor, so a smaller image's box includes its zero padding."""
        if self.legacy_padded_image_box:
            h, w = images.tensor.shape[-2:]
            return [(int(h), int(w))] * len(images.image_sizes)
        return list(images.image_sizes)

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        if self.concept_emb.shape[0] == 0:
            raise RuntimeError("no concept pool: set MODEL.CLIP.CONCEPT_POOL_EMB (make it with "
                               "tools/extract_concepts.py) or call model.set_concept_pool(...)")
        images = self.preprocess_image(batched_inputs)
        regions = [r.proposal_boxes for r in self.get_regions(batched_inputs, images.image_sizes)]
        with torch.no_grad():
            t_feats = self.region_pooler(self.teacher_backbone(images.tensor), regions,
                                         self.teacher_backbone.encode_pooled_regions, teacher=True)
            labels, soft, keep = pseudo_labels(cosine_logits(t_feats, self.teacher_concept_emb, self.tau),
                                               self.concept_threshold)
        s_features = self.backbone(images.tensor)
        s_feats = self.region_pooler(s_features, regions, self.backbone.encode_pooled_regions)
        if not self.training:
            out, start = [], 0
            for r in regions:
                emb = torch.nn.functional.normalize(s_feats[start:start + len(r)], dim=-1)
                out.append({"regions": r, "embeddings": emb,
                            "pseudo_labels": labels[start:start + len(r)]})
                start += len(r)
            return out
        s_logits = cosine_logits(s_feats, self.concept_emb, self.tau)
        w = self.loss_weights
        losses = {
            "loss_region_contrastive": w[0] * region_concept_contrastive_loss(s_logits[keep], labels[keep],
                                                                          self.contrastive_form),
            "loss_region_distillation": w[1] * region_concept_distillation_loss(s_logits[keep], soft[keep]),
        }
        if self.image_text:
            captions = [x.get("caption") for x in batched_inputs]
            if any(not isinstance(c, str) for c in captions):
                raise ValueError("image-text pretraining needs a 'caption' string per input "
                                 "(or set MODEL.CLIP.PRETRAIN_IMG_TXT_LEVEL False)")
            with torch.no_grad():  # the text encoder is frozen: embeddings once per batch, no graph
                text = self.lang_encoder(self.lang_encoder.tokenize(captions)).float()
            full = [Boxes(torch.tensor([[0.0, 0.0, w_, h_]], device=self.device, dtype=torch.float32))
                    for h_, w_ in self.image_box_sizes(images)]
            img_emb = self.region_pooler(s_features, full, self.backbone.encode_pooled_regions)
            losses["loss_image_text"] = w[2] * image_text_contrastive_loss(img_emb, text, self.tau, self.gather)
        storage = _event_storage()
        if storage is not None:  # inside a trainer: log how many regions and concepts were used
            storage.put_scalar("pretrain/kept_regions", float(keep.float().mean()))
            storage.put_scalar("pretrain/matched_concepts", float(torch.unique(labels[keep]).numel()))
        return losses


def _event_storage():
    """detectron2's current EventStorage, or None outside a trainer (detectron2 has no public
    test for one: ``get_event_storage`` asserts)."""
    try:
        return get_event_storage()
    except AssertionError:
        return None


def load_pretrain_from_cfg(cfg, parts: Dict) -> Dict:
    """Load what the config names into the built submodules ``parts`` (``from_config``'s
    arguments): CLIP weights (student and teacher start equal), the teacher's own weights, the
    RPN branch. Returns the constructor arguments that carry what was read: the concept pools
    and ``rpn_weights_file``."""
    c = cfg.MODEL.CLIP
    trusted = c.TRUST_CHECKPOINTS
    backbone, teacher = parts["backbone"], parts["teacher_backbone"]
    out = {}
    if c.CLIP_WEIGHTS:
        load_clip_weights(c.CLIP_WEIGHTS, backbone=backbone, lang_encoder=parts["lang_encoder"], trusted=trusted)
        if not c.TEACHER_OPENCLIP_MODEL and not c.TEACHER_CLIP_WEIGHTS:
            load_clip_weights(c.CLIP_WEIGHTS, backbone=teacher, trusted=trusted)
    if c.TEACHER_CLIP_WEIGHTS:
        load_clip_weights(c.TEACHER_CLIP_WEIGHTS, backbone=teacher, trusted=trusted)
    elif not c.CLIP_WEIGHTS or c.TEACHER_OPENCLIP_MODEL:
        if not c.TEACHER_OPENCLIP_MODEL:  # random weights: still start the student equal to the teacher
            backbone.load_state_dict(teacher.state_dict(), strict=False)
    if c.BB_RPN_WEIGHTS and parts.get("offline_backbone") is not None:
        holder = torch.nn.Module()
        holder.offline_backbone, holder.offline_proposal_generator = (parts["offline_backbone"],
                                                                      parts["offline_proposal_generator"])
        load_rpn_weights(c.BB_RPN_WEIGHTS, holder, trusted=trusted)
        out["rpn_weights_file"] = c.BB_RPN_WEIGHTS
    if c.CONCEPT_POOL_EMB:
        out["concept_emb"] = load_text_embeddings(c.CONCEPT_POOL_EMB, backbone.embed_dim,
                                                  "MODEL.CLIP.CONCEPT_POOL_EMB", trusted=trusted)
        if c.TEACHER_CONCEPT_POOL_EMB:
            out["teacher_concept_emb"] = load_text_embeddings(
                c.TEACHER_CONCEPT_POOL_EMB, teacher.embed_dim, "MODEL.CLIP.TEACHER_CONCEPT_POOL_EMB",
                trusted=trusted)
    return out
