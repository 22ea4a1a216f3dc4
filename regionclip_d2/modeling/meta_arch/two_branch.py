"""What both CLIP meta-architectures share (docs/architecture.md, "Two branches").

The recognition branch is a CLIP ResNet working on CLIP-normalised RGB; the localization
branch (the "offline" RPN of the official code) is a detectron2 backbone + RPN with its own
input format and normalisation, frozen unless MODEL.CLIP.TRAIN_OFFLINE_RPN. :class:`TwoBranchModel`
holds the input normalisation of both, the RPN branch (built by :func:`rpn_branch_from_config`),
its freezing and train/eval handling, :meth:`TwoBranchModel.propose`, and the load hook that
maps any supported weight file onto the model's keys.
"""
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from detectron2.config import get_cfg
from detectron2.modeling import build_backbone, build_proposal_generator
from detectron2.structures import ImageList, Instances

from ...checkpoint.loading import install_load_hook

# shared by all models (a lock or thread-local attribute would make a model impossible to deepcopy
# or pickle): the folded copies are made under the lock; _FOLDING.models holds, per thread, the
# ids of the models whose current inference call runs them
_FOLD_LOCK = threading.Lock()
_FOLDING = threading.local()


def build_offline_rpn_cfg(cfg, post_nms_topk_test: Optional[int] = None):
    """The detectron2 config of the RPN branch (MODEL.CLIP.OFFLINE_RPN_CONFIG) with the
    overrides of MODEL.CLIP (NMS threshold, proposals kept at test time)."""
    if not cfg.MODEL.CLIP.OFFLINE_RPN_CONFIG:
        raise ValueError("MODEL.CLIP.CROP_REGION_TYPE is 'RPN' but MODEL.CLIP.OFFLINE_RPN_CONFIG is empty: "
                         "give the yaml of the RPN branch, or set CROP_REGION_TYPE to 'GT'")
    from ... import resolve_config_path

    ocfg = get_cfg()
    ocfg.set_new_allowed(True)
    ocfg.merge_from_file(resolve_config_path(cfg.MODEL.CLIP.OFFLINE_RPN_CONFIG))
    if cfg.MODEL.CLIP.OFFLINE_RPN_NMS_THRESH:
        ocfg.MODEL.RPN.NMS_THRESH = cfg.MODEL.CLIP.OFFLINE_RPN_NMS_THRESH
    if post_nms_topk_test:
        ocfg.MODEL.RPN.POST_NMS_TOPK_TEST = post_nms_topk_test
    elif cfg.MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST:
        ocfg.MODEL.RPN.POST_NMS_TOPK_TEST = cfg.MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST
    ocfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    return ocfg


def rpn_branch_from_config(cfg, post_nms_topk_test: Optional[int] = None) -> Dict:
    """Constructor arguments of the RPN branch (``offline_backbone``,
    ``offline_proposal_generator`` and its input format / normalisation); empty unless
    MODEL.CLIP.CROP_REGION_TYPE is RPN."""
    if cfg.MODEL.CLIP.CROP_REGION_TYPE != "RPN":
        return {}
    ocfg = build_offline_rpn_cfg(cfg, post_nms_topk_test)
    backbone = build_backbone(ocfg)
    return dict(offline_backbone=backbone,
                offline_proposal_generator=build_proposal_generator(ocfg, backbone.output_shape()),
                offline_pixel_mean=ocfg.MODEL.PIXEL_MEAN, offline_pixel_std=ocfg.MODEL.PIXEL_STD,
                offline_input_format=ocfg.INPUT.FORMAT)


class TwoBranchModel(nn.Module):
    """Base of the CLIP meta-architectures: inputs of both branches, the RPN branch and the
    modules kept frozen (always in eval mode, no gradients).

    Subclasses call :meth:`_init_two_branch` in their constructor and list their own frozen
    modules with :meth:`frozen_modules`.

    Attributes:
        rpn_weights_file: where the RPN branch's weights came from (MODEL.CLIP.BB_RPN_WEIGHTS);
            when set, they win over the ``offline_*`` keys of any checkpoint loaded later.
    """

    def _init_two_branch(self, *, pixel_mean: Sequence[float], pixel_std: Sequence[float], input_format: str,
                         offline_backbone: Optional[nn.Module] = None,
                         offline_proposal_generator: Optional[nn.Module] = None,
                         offline_pixel_mean: Sequence[float] = (103.53, 116.28, 123.675),
                         offline_pixel_std: Sequence[float] = (1.0, 1.0, 1.0), offline_input_format: str = "BGR",
                         train_offline_rpn: bool = False, rpn_weights_file: str = ""):
        if (offline_backbone is None) != (offline_proposal_generator is None):
            raise ValueError("the RPN branch needs both offline_backbone and offline_proposal_generator")
        self.offline_backbone = offline_backbone
        self.offline_proposal_generator = offline_proposal_generator
        self.train_offline_rpn = train_offline_rpn
        self.rpn_weights_file = rpn_weights_file
        self.input_format = input_format
        self.offline_input_format = offline_input_format
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.register_buffer("offline_pixel_mean", torch.tensor(offline_pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("offline_pixel_std", torch.tensor(offline_pixel_std).view(-1, 1, 1), False)
        # official convention: a mean summing to < 3 means the model works on 0..1 input
        self.div_pixel = float(np.sum(pixel_mean)) < 3.0
        self.offline_div_pixel = float(np.sum(offline_pixel_mean)) < 3.0
        for m in self.frozen_modules():
            for p in m.parameters():
                p.requires_grad = False
        install_load_hook(self)
        # MODEL.CLIP.FOLD_BATCHNORM: inference runs folded copies of the backbones (see
        # inference_module); not registered as submodules, so weights and training are untouched
        self.__dict__.setdefault("fold_batchnorm", False)
        self.__dict__["_folded"] = None
        self.register_load_state_dict_post_hook(_drop_folded_after_load)

    @property
    def has_rpn_branch(self) -> bool:
        return self.offline_backbone is not None

    def frozen_modules(self) -> List[nn.Module]:
        """Modules without gradients, kept in eval mode: here the RPN branch unless it is
        trained; subclasses add theirs."""
        if self.has_rpn_branch and not self.train_offline_rpn:
            return [self.offline_backbone, self.offline_proposal_generator]
        return []

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()
        self.drop_folded()
        return self

    # ------------------------------------------------------------------ folded BatchNorms
    def drop_folded(self):
        """Forget the folded copies (weights, mode or device changed; made again when needed)."""
        if "_folded" in self.__dict__:
            self.__dict__["_folded"] = None

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .float(): the copies follow by being made again
        out = super()._apply(fn, *args, **kwargs)
        self.drop_folded()
        return out

    def folded_modules(self) -> Dict[str, nn.Module]:
        """Copies of ``backbone`` and the RPN branch's backbone with their fixed BatchNorms folded
        into the convolutions (``regionclip_d2.modeling.fold``), made on first use after the
        model last changed mode, weights or device. They share the weights folding leaves alone
        and are in channels-last memory format on CPU (oneDNN's fast layout; measured by
        ``bench/fold_frozen_bn.py``) and, on other devices, with ``MODEL.CLIP.CHANNELS_LAST``.
        Changing parameters in place afterwards needs :meth:`drop_folded` (``model.eval()`` does it)."""
        from ..fold import folded_copy

        with _FOLD_LOCK:
            if self._folded is None:
                cl = self.device.type == "cpu" or bool(getattr(self, "channels_last", False))
                folded = {"backbone": folded_copy(self.backbone, channels_last=cl)}
                if self.has_rpn_branch:
                    folded["offline_backbone"] = folded_copy(self.offline_backbone, channels_last=cl)
                self.__dict__["_folded"] = folded
            return self._folded

    def folding(self) -> bool:
        """True inside an inference call of this thread that runs the folded copies."""
        return id(self) in getattr(_FOLDING, "models", ())

    def set_folding(self, on: bool):
        """Run the folded copies (or not) in this thread's calls (the inference of subclasses)."""
        models = _FOLDING.__dict__.setdefault("models", set())
        if on:
            models.add(id(self))
        else:
            models.discard(id(self))

    def inference_module(self, name: str) -> nn.Module:
        """``backbone`` / ``offline_backbone``, or its folded copy while :meth:`folding`."""
        return self.folded_modules()[name] if self.folding() else getattr(self, name)

    @property
    def device(self):
        return self.pixel_mean.device

    # ------------------------------------------------------------------ inputs
    def preprocess_image(self, batched_inputs) -> ImageList:
        """Recognition branch input: RGB, /255 when the mean is in 0..1 units, CLIP
        normalisation, zero padding (in normalised space) to the batch's largest size."""
        images = [self._to_format(x["image"], self.input_format).to(self.device) for x in batched_inputs]
        if self.div_pixel:
            images = [x / 255.0 for x in images]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        if getattr(self, "channels_last", False):
            images.tensor = images.tensor.contiguous(memory_format=torch.channels_last)
        # images smaller than the backbone's total stride are padded (zeros) to 32 px;
        # larger ones are left as they are, like the official code
        h, w = images.tensor.shape[-2:]
        if h < 32 or w < 32:
            t = torch.nn.functional.pad(images.tensor, (0, max(0, 32 - w), 0, max(0, 32 - h)))
            images = ImageList(t, images.image_sizes)
        return images

    def offline_preprocess_image(self, batched_inputs) -> ImageList:
        """RPN branch input: its own format, mean/std, padded to its size divisibility."""
        images = [self._to_format(x["image"], self.offline_input_format).to(self.device).float()
                  for x in batched_inputs]
        if self.offline_div_pixel:
            images = [x / 255.0 for x in images]
        images = [(x - self.offline_pixel_mean) / self.offline_pixel_std for x in images]
        return ImageList.from_tensors(images, self.offline_backbone.size_divisibility)

    def _to_format(self, image: torch.Tensor, fmt: str) -> torch.Tensor:
        # Inputs follow cfg.INPUT.FORMAT (the recognition branch's); flip for the other format.
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"each input 'image' must be a [3, H, W] tensor in {self.input_format} order, "
                             f"got shape {tuple(image.shape)}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"an input image is empty (shape {tuple(image.shape)}): give an image with pixels")
        if fmt != self.input_format and {fmt, self.input_format} == {"RGB", "BGR"}:
            image = image.flip(0)
        return image.float()

    # ------------------------------------------------------------------ the RPN branch
    def propose(self, batched_inputs, gt_instances=None) -> Tuple[List[Instances], Dict[str, torch.Tensor]]:
        """The RPN branch's proposals (``proposal_boxes``, ``objectness_logits``) on the
        recognition branch's device, and its losses (only when it is trained: training mode,
        MODEL.CLIP.TRAIN_OFFLINE_RPN and ``gt_instances`` given; else empty)."""
        if not self.has_rpn_branch:
            raise ValueError("this model has no RPN branch (MODEL.CLIP.OFFLINE_RPN_CONFIG with CROP_REGION_TYPE RPN)")
        trained = self.training and self.train_offline_rpn and gt_instances is not None
        with torch.set_grad_enabled(trained):
            images = self.offline_preprocess_image(batched_inputs)
            features = self.inference_module("offline_backbone")(images.tensor)
            proposals, losses = self.offline_proposal_generator(images, features, gt_instances if trained else None)
        return [p.to(self.device) for p in proposals], (losses if trained else {})


def _drop_folded_after_load(model, incompatible_keys):
    """Load post-hook (a module-level function, so that models pickle): new weights, new folded copies."""
    model.drop_folded()
