"""CLIP's ModifiedResNet as a detectron2 Backbone (C4 and FPN).

The module adopts the submodules of open_clip's ``ModifiedResNet`` under their own
names (``conv1``, ``bn1``, ..., ``layer1``..``layer4``, ``attnpool``), so a state
dict of an OpenAI / OpenCLIP image tower (``visual.*``) or of an official RegionCLIP
checkpoint (``backbone.*``) maps onto it key for key.

Stages follow detectron2's names: ``stem`` (3 convs + avgpool, stride 4), ``res2`` ..
``res5`` = ``layer1`` .. ``layer4`` (strides 4, 8, 16, 32). In the C4 design the
backbone outputs ``res4``; ``layer4`` (res5) and ``attnpool`` stay here and are used
by the RoI head on pooled regions.
"""
from typing import List

import torch
from torch import nn

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from ..clip_model import build_visual_tower
from .attention_pool import attention_pool

_STEM = ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3", "act3", "avgpool")
_STAGES = ("res2", "res3", "res4", "res5")
_LAYERS = dict(zip(_STAGES, ("layer1", "layer2", "layer3", "layer4")))


class CLIPResNet(Backbone):
    """CLIP ModifiedResNet with detectron2's Backbone interface.

    Args:
        visual: an open_clip ``ModifiedResNet`` (weights are taken over, not copied).
        out_features: stages to return, among ``stem, res2, res3, res4, res5``.
        freeze_at: detectron2 semantics; 1 freezes the stem, 2 also res2, ... 5 also res5.
        norm: ``"FrozenBN"`` (all BatchNorms frozen, the official setting) or ``"BN"``
            (BatchNorms of unfrozen stages stay trainable).
    """

    def __init__(self, visual: nn.Module, out_features: List[str], freeze_at: int = 0,
                 norm: str = "FrozenBN"):
        super().__init__()
        for name in _STEM + tuple(_LAYERS.values()) + ("attnpool",):
            self.add_module(name, getattr(visual, name))
        self.output_dim = visual.output_dim
        self.image_size = visual.image_size
        width = self.conv3.out_channels
        self._out_feature_channels = {"stem": width}
        self._out_feature_strides = {"stem": 4}
        for i, stage in enumerate(_STAGES):
            self._out_feature_channels[stage] = width * 4 * 2 ** i
            self._out_feature_strides[stage] = 4 * 2 ** i
        unknown = set(out_features) - set(self._out_feature_channels)
        if unknown or not out_features:
            raise ValueError(f"CLIP ResNet out_features {out_features} invalid: choose among "
                             f"{list(self._out_feature_channels)}")
        self._out_features = list(out_features)
        self._last_stage = max(_STAGES.index(f) + 1 if f in _STAGES else 0 for f in out_features)
        if norm == "FrozenBN":
            FrozenBatchNorm2d.convert_frozen_batchnorm(self)
        elif norm != "BN":
            raise ValueError(f"MODEL.RESNETS.NORM={norm!r} is not supported for CLIP ResNets: "
                             "use 'FrozenBN' (official) or 'BN'")
        self.freeze(freeze_at)

    @property
    def embed_dim(self) -> int:
        """Dimension of the attention pool's output (CLIP's joint embedding space)."""
        return self.attnpool.c_proj.out_features

    def freeze(self, freeze_at: int = 0):
        """Freeze the stem (``freeze_at >= 1``) and stages res2..res5 (``>= 2..5``)."""
        groups = [list(_STEM)] + [[_LAYERS[s]] for s in _STAGES]
        for idx, names in enumerate(groups, start=1):
            if freeze_at >= idx:
                for name in names:
                    m = getattr(self, name)
                    for p in m.parameters():
                        p.requires_grad = False
                    # returns a new module when ``m`` itself is a BatchNorm
                    setattr(self, name, FrozenBatchNorm2d.convert_frozen_batchnorm(m))
        return self

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward(self, x: torch.Tensor):
        """``[N, 3, H, W]`` normalised images -> dict of the requested stage maps."""
        if x.dim() != 4:
            raise ValueError(f"CLIP ResNet takes [N, C, H, W] images, got shape {tuple(x.shape)}")
        outputs = {}
        x = self.stem(x.to(self.conv1.weight.dtype))
        if "stem" in self._out_features:
            outputs["stem"] = x
        for i, stage in enumerate(_STAGES, start=1):
            if i > self._last_stage:
                break
            x = getattr(self, _LAYERS[stage])(x)
            if stage in self._out_features:
                outputs[stage] = x
        return outputs

    def encode_pooled_regions(self, pooled: torch.Tensor) -> torch.Tensor:
        """RoI-pooled res4 features ``[R, C4, S, S]`` -> ``[R, D]`` region embeddings
        (res5, then the attention pool with positional embedding resized to ``S/2``)."""
        return attention_pool(self.attnpool, self.layer4(pooled))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-image embedding, as CLIP computes it: ``[N, 3, H, W]`` -> ``[N, D]``."""
        x = self.stem(x.to(self.conv1.weight.dtype))
        for name in _LAYERS.values():
            x = getattr(self, name)(x)
        return attention_pool(self.attnpool, x)


def clip_resnet_from_cfg(cfg, out_features, model_name=None, freeze_at=None) -> CLIPResNet:
    visual, _ = build_visual_tower(model_name or cfg.MODEL.CLIP.OPENCLIP_MODEL,
                                   cfg.MODEL.CLIP.OPENCLIP_MODEL_CONFIG if model_name is None else "")
    return CLIPResNet(
        visual,
        out_features=out_features,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT if freeze_at is None else freeze_at,
        norm=cfg.MODEL.RESNETS.NORM,
    )


@BACKBONE_REGISTRY.register()
def build_clip_resnet_backbone(cfg, input_shape: ShapeSpec):
    """C4: the CLIP ResNet returning ``MODEL.RESNETS.OUT_FEATURES`` (``["res4"]``)."""
    if input_shape.channels != 3:
        raise ValueError(f"CLIP ResNets take 3-channel images, config gives {input_shape.channels}")
    return clip_resnet_from_cfg(cfg, list(cfg.MODEL.RESNETS.OUT_FEATURES))


@BACKBONE_REGISTRY.register()
def build_clip_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """FPN over the CLIP ResNet's res2..res5 (``MODEL.FPN.IN_FEATURES``), with a
    max-pooled extra level as in detectron2's R50-FPN. The attention pool stays on
    ``backbone.bottom_up`` for the RoI head."""
    bottom_up = clip_resnet_from_cfg(cfg, list(cfg.MODEL.FPN.IN_FEATURES))
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
