"""CLIPSelf: self-distillation of a CLIP ViT's dense features (docs/method.md, "CLIPSelf").

image -> regions (an m x n grid, m and n drawn from 1..MAX_GRID per image; or given boxes)
-> teacher: the frozen CLIP ViT's image embedding of each region's crop, resized to the
teacher's input size -> student: the trained ViT's dense map (value path of the last block,
:mod:`regionclip_d2.modeling.backbone.clip_vit`) RoI-pooled over each region -> loss
``mean_r (1 - cos(student_r, teacher_r))``. No labels, no text.
"""
import copy
import logging
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from detectron2.config import configurable
from detectron2.layers import ROIAlign
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import Boxes, ImageList, Instances

from ...checkpoint.loading import load_clip_weights
from ..backbone.clip_vit import CLIPViT, ImageTooSmallError
from .pretrain import grid_boxes
from .two_branch import TwoBranchModel

logger = logging.getLogger(__name__)

CLIPSELF_REGION_TYPES = ("GRID", "PROPOSALS")


class RegionOutsideImageError(ValueError):
    pass


def random_grid_boxes(h: int, w: int, max_grid: int, device=None) -> torch.Tensor:
    """``[m * n, 4]`` XYXY cells of an ``m x n`` grid (m rows, n columns) over an ``h x w`` image,
    ``m`` and ``n`` drawn independently and uniformly from ``1..max_grid`` with torch's RNG (in
    that order); cells row by row."""
    m, n = (int(v) for v in torch.randint(1, max_grid + 1, (2,)))
    return grid_boxes(h, w, m, n, device=device)


def check_boxes_inside(boxes: torch.Tensor, h: int, w: int, index: int, tol: float = 1e-3):
    """Raise :class:`RegionOutsideImageError` for boxes that are empty or leave the ``h x w`` image."""
    if boxes.numel() == 0:
        return
    x0, y0, x1, y1 = boxes.unbind(1)
    bad = (x0 < -tol) | (y0 < -tol) | (x1 > w + tol) | (y1 > h + tol) | (x1 <= x0) | (y1 <= y0)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise RegionOutsideImageError(
            f"input {index}: {int(bad.sum())} of {len(boxes)} region boxes are empty or fall outside the "
            f"{w}x{h} image (e.g. box {i}: {[round(float(v), 2) for v in boxes[i]]}, XYXY in the input image's "
            "pixels): clip the boxes to the image (Boxes.clip) and drop empty ones, or give boxes in the "
            "coordinates of the resized input image")


@META_ARCH_REGISTRY.register()
class CLIPSelf(TwoBranchModel):
    """Student CLIP ViT (``backbone``, trained) and teacher (``teacher_backbone``: a frozen copy
    of the student as it was built, so both start equal).

    Inputs: dicts with ``image`` ([3, H, W] in cfg.INPUT.FORMAT); with ``REGION_TYPE PROPOSALS``
    also ``proposals`` (Instances with ``proposal_boxes``, as detectron2's mapper gives them
    with ``MODEL.LOAD_PROPOSALS``) in the input image's pixels. Anything else (captions,
    annotations) is ignored.

    Per region ``r`` (XYXY in input pixels) of image ``b``:

    * teacher: ``t_r = teacher.encode_image(crop_r)``, ``crop_r`` = RoIAlign of the normalised
      image over ``r`` to ``S x S`` pixels (``S`` = TEACHER_INPUT_SIZE, default the ViT's native
      size; ``aligned=True``, spatial scale 1, TEACHER_SAMPLING_RATIO samples per output pixel
      side, 0 = adaptive ``ceil(box side / S)``): the crop resized bilinearly (area-averaged
      when shrinking);
    * student: ``s_r = mean_{k x k bins} RoIAlign(dense_b, r)``: RoIAlign of the student's
      dense map (``aligned=True``, spatial scale ``1/p``, POOLER_SAMPLING_RATIO, 0 = adaptive)
      to ``k x k`` bins (k = POOLER_RESOLUTION, default 1 as in the official code), then the
      mean over the bins;
    * loss: ``loss_clipself = mean_r (1 - <s_r/|s_r|, t_r/|t_r|>)`` over all regions of the batch.

    Training returns ``{"loss_clipself"}``; eval mode returns per image the regions, the
    student's and the teacher's L2-normalised embeddings and their cosine.
    """

    @configurable
    def __init__(self, *, backbone: CLIPViT, teacher_backbone: CLIPViT, region_type: str = "GRID",
                 max_grid: int = 6, max_proposals: int = 36, pooler_resolution: int = 1,
                 pooler_sampling_ratio: int = 0, teacher_input_size: int = 0, teacher_sampling_ratio: int = 0,
                 pixel_mean, pixel_std, input_format: str = "RGB"):
        super().__init__()
        for bb, key in ((backbone, "backbone"), (teacher_backbone, "teacher_backbone")):
            if not isinstance(bb, CLIPViT):
                raise ValueError(f"CLIPSelf needs CLIP ViTs with a dense map, but its {key} is a "
                                 f"{type(bb).__name__}: set MODEL.BACKBONE.NAME build_clip_vit_backbone and "
                                 "MODEL.CLIP.OPENCLIP_MODEL to a CLIP ViT (e.g. ViT-B-16)")
        if region_type not in CLIPSELF_REGION_TYPES:
            raise ValueError(f"MODEL.CLIPSELF.REGION_TYPE={region_type!r}: use one of {CLIPSELF_REGION_TYPES}")
        if int(max_grid) < 1:
            raise ValueError(f"MODEL.CLIPSELF.MAX_GRID={max_grid}: the grid's rows and columns are drawn from "
                             "1..MAX_GRID, so it must be at least 1 (the paper uses 6)")
        if int(pooler_resolution) < 1:
            raise ValueError(f"MODEL.CLIPSELF.POOLER_RESOLUTION={pooler_resolution}: must be at least 1")
        if max_proposals < 0:
            raise ValueError(f"MODEL.CLIPSELF.MAX_PROPOSALS={max_proposals}: must be 0 (all) or more")
        self.backbone = backbone
        self.teacher_backbone = teacher_backbone
        self.region_type = region_type
        self.max_grid = int(max_grid)
        self.max_proposals = int(max_proposals)
        size = teacher_input_size or teacher_backbone.image_size
        self.teacher_input_size: Tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        p = backbone.patch_size
        self.student_pooler = ROIAlign((pooler_resolution, pooler_resolution), 1.0 / p, pooler_sampling_ratio,
                                       aligned=True)
        self.crop_pooler = ROIAlign(self.teacher_input_size, 1.0, teacher_sampling_ratio, aligned=True)
        self._init_two_branch(pixel_mean=pixel_mean, pixel_std=pixel_std, input_format=input_format)

    @classmethod
    def from_config(cls, cfg):
        cs = cfg.MODEL.CLIPSELF
        if cfg.MODEL.BACKBONE.FREEZE_AT > 0:
            raise ValueError(f"MODEL.BACKBONE.FREEZE_AT={cfg.MODEL.BACKBONE.FREEZE_AT} freezes the CLIP ViT, but "
                             "CLIPSelf trains the student ViT: set MODEL.BACKBONE.FREEZE_AT 0")
        backbone = build_backbone(cfg)
        if isinstance(backbone, CLIPViT) and cfg.MODEL.CLIP.CLIP_WEIGHTS:
            load_clip_weights(cfg.MODEL.CLIP.CLIP_WEIGHTS, backbone=backbone, trusted=cfg.MODEL.CLIP.TRUST_CHECKPOINTS)
        teacher = copy.deepcopy(backbone)  # the teacher starts equal to the student and stays so
        if isinstance(teacher, CLIPViT):
            teacher.freeze()
        return dict(backbone=backbone, teacher_backbone=teacher, region_type=cs.REGION_TYPE, max_grid=cs.MAX_GRID,
                    max_proposals=cs.MAX_PROPOSALS, pooler_resolution=cs.POOLER_RESOLUTION,
                    pooler_sampling_ratio=cs.POOLER_SAMPLING_RATIO, teacher_input_size=cs.TEACHER_INPUT_SIZE,
                    teacher_sampling_ratio=cs.TEACHER_SAMPLING_RATIO, pixel_mean=cfg.MODEL.PIXEL_MEAN,
                    pixel_std=cfg.MODEL.PIXEL_STD, input_format=cfg.INPUT.FORMAT)

    def frozen_modules(self):
        return [self.teacher_backbone]

    # ------------------------------------------------------------------ inputs and regions
    def preprocess_image(self, batched_inputs) -> ImageList:
        p = self.backbone.patch_size
        for i, x in enumerate(batched_inputs):
            h, w = x["image"].shape[-2:]
            if h < p or w < p:
                raise ImageTooSmallError(
                    f"input {i}: an image of {h}x{w} pixels is smaller than one {p}x{p} patch of the CLIP ViT: "
                    f"resize the images to at least {p} pixels a side (INPUT.MIN_SIZE_TRAIN) or drop them")
        return super().preprocess_image(batched_inputs)

    def get_regions(self, batched_inputs, image_sizes: List[Tuple[int, int]]) -> List[Boxes]:
        """The regions of each input (XYXY, the input image's pixels): a random grid, or the
        input's ``proposals`` (at most MAX_PROPOSALS, a random subset), checked to lie inside."""
        out = []
        for i, (x, (h, w)) in enumerate(zip(batched_inputs, image_sizes)):
            if self.region_type == "GRID":
                out.append(Boxes(random_grid_boxes(h, w, self.max_grid, device=self.device)))
                continue
            props = x.get("proposals")
            if props is None:
                raise ValueError(f"input {i} has no 'proposals' but MODEL.CLIPSELF.REGION_TYPE is PROPOSALS: give "
                                 "proposal files (DATASETS.PROPOSAL_FILES_TRAIN with MODEL.LOAD_PROPOSALS True) or "
                                 "set REGION_TYPE GRID")
            boxes = props.proposal_boxes if isinstance(props, Instances) else props
            boxes = (boxes.tensor if isinstance(boxes, Boxes) else torch.as_tensor(boxes)).float().reshape(-1, 4)
            check_boxes_inside(boxes, h, w, i)
            if self.max_proposals and len(boxes) > self.max_proposals:
                boxes = boxes[torch.randperm(len(boxes))[: self.max_proposals]]
            out.append(Boxes(boxes.to(self.device)))
        if sum(len(b) for b in out) == 0:
            raise ValueError("no region in the whole batch: every input's 'proposals' is empty")
        return out

    # ------------------------------------------------------------------ embeddings
    def student_embeddings(self, dense: torch.Tensor, regions: List[Boxes]) -> torch.Tensor:
        """``[R, D]``: RoIAlign of the dense map over each region, the mean of the k x k bins."""
        rois = _rois(regions)
        return self.student_pooler(dense, rois.to(dense.dtype)).mean(dim=(2, 3))

    @torch.no_grad()
    def teacher_embeddings(self, images: torch.Tensor, regions: List[Boxes]) -> torch.Tensor:
        """``[R, D]``: the frozen ViT's image embedding of each region's crop (resized to S x S)."""
        crops = self.crop_pooler(images, _rois(regions).to(images.dtype))
        return self.teacher_backbone.encode_image(crops)

    @torch.no_grad()
    def encode_boxes(self, batched_inputs: List[Dict], boxes: Sequence, teacher: bool = False) -> List[torch.Tensor]:
        """Embeddings of given boxes: the student's dense map RoI-pooled over each box, as in
        training (or, with ``teacher``, the frozen teacher's image embedding of each box's crop).

        Args:
            batched_inputs: inputs as for ``forward`` (``image`` ``[3, H, W]``, already resized).
            boxes: per input, a ``Boxes`` or ``[R_i, 4]`` XYXY tensor in the input image's pixels,
                inside the image.
        Returns:
            per input, ``[R_i, D]`` L2-normalised embeddings in CLIP's joint space.
        """
        if len(boxes) != len(batched_inputs):
            raise ValueError(f"{len(boxes)} box sets for {len(batched_inputs)} images: give one per image")
        boxes = [b if isinstance(b, Boxes) else Boxes(torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4))
                 for b in boxes]
        images = self.preprocess_image(batched_inputs)
        for i, (b, (h, w)) in enumerate(zip(boxes, images.image_sizes)):
            check_boxes_inside(b.tensor, h, w, i)
        boxes = [b.to(self.device) for b in boxes]
        if teacher:
            emb = self.teacher_embeddings(images.tensor, boxes)
        else:
            emb = self.student_embeddings(self.backbone(images.tensor)["dense"], boxes)
        return list(F.normalize(emb.float(), dim=-1).split([len(b) for b in boxes]))

    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess_image(batched_inputs)
        regions = self.get_regions(batched_inputs, images.image_sizes)
        teacher = self.teacher_embeddings(images.tensor, regions)
        student = self.student_embeddings(self.backbone(images.tensor)["dense"], regions)
        s, t = F.normalize(student, dim=-1), F.normalize(teacher.float(), dim=-1)
        cos = (s * t).sum(dim=-1)
        if self.training:
            return {"loss_clipself": (1.0 - cos).mean()}
        out, start = [], 0
        for r in regions:
            sl = slice(start, start + len(r))
            out.append({"regions": r, "embeddings": s[sl], "teacher_embeddings": t[sl], "cosine": cos[sl]})
            start += len(r)
        return out


def _rois(regions: List[Boxes]) -> torch.Tensor:
    """detectron2's RoI format ``[R, 5]``: batch index, then XYXY."""
    return torch.cat([torch.cat([torch.full((len(b), 1), i, dtype=b.tensor.dtype, device=b.tensor.device),
                                 b.tensor], dim=1) for i, b in enumerate(regions)], dim=0)
