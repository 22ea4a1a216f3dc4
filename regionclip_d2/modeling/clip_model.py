"""Building open_clip's CLIP towers by model name or model-config file.

One place knows how an open_clip architecture is described, so that the backbone,
the language encoder and the checkpoint converter all build the same thing.
"""
import json
import os
from typing import Any, Dict, Tuple

import open_clip


class UnknownCLIPModelError(ValueError):
    pass


def resnet_model_names():
    """open_clip model names whose image tower is a ModifiedResNet."""
    names = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        if isinstance(cfg.get("vision_cfg", {}).get("layers"), (list, tuple)):
            names.append(name)
    return names


def vit_model_names():
    """open_clip model names whose image tower is a plain VisionTransformer (no timm tower,
    no attentional pooler): the towers :class:`~regionclip_d2.modeling.backbone.clip_vit.CLIPViT`
    takes."""
    names = []
    for name in open_clip.list_models():
        vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
        if isinstance(vision.get("layers"), int) and not vision.get("timm_model_name") \
                and not vision.get("attentional_pool"):
            names.append(name)
    return names


def is_vit_config(cfg: Dict[str, Any]) -> bool:
    """Whether an open_clip model config describes a ViT image tower (``layers`` an int)."""
    return isinstance(cfg["vision_cfg"].get("layers"), int)


def get_clip_model_config(model_name: str, config_file: str = "") -> Dict[str, Any]:
    """The open_clip architecture description: ``embed_dim``, ``vision_cfg``, ``text_cfg``,
    ``quick_gelu``. From ``config_file`` (an open_clip model-config JSON) if given,
    else from open_clip's registry by ``model_name``."""
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(
                f"open_clip model config {config_file!r} does not exist: set "
                "MODEL.CLIP.OPENCLIP_MODEL_CONFIG to an open_clip model-config JSON or leave it empty")
        with open(config_file) as f:
            cfg = json.load(f)
    else:
        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            raise UnknownCLIPModelError(
                f"unknown open_clip model {model_name!r}: set MODEL.CLIP.OPENCLIP_MODEL to one of "
                f"{', '.join(resnet_model_names())} (or give MODEL.CLIP.OPENCLIP_MODEL_CONFIG)")
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ValueError(f"open_clip model config for {model_name or config_file!r} lacks {key!r}")
    cfg = dict(cfg)
    cfg.setdefault("quick_gelu", False)
    return cfg


def _check_resnet(cfg, what):
    if not isinstance(cfg["vision_cfg"].get("layers"), (list, tuple)):
        raise UnknownCLIPModelError(
            f"{what} has a ViT image tower but the CLIP ResNet backbone was asked for: set MODEL.CLIP.OPENCLIP_MODEL "
            f"to a CLIP ResNet (one of {', '.join(resnet_model_names())}), or build the ViT with "
            "MODEL.BACKBONE.NAME build_clip_vit_backbone (or build_clip_vit_sfp_backbone)")


def _check_vit(cfg, what):
    vision = cfg["vision_cfg"]
    if not is_vit_config(cfg):
        raise UnknownCLIPModelError(
            f"{what} has a ResNet image tower but the CLIP ViT backbone was asked for: set MODEL.CLIP.OPENCLIP_MODEL "
            "to a CLIP ViT (e.g. ViT-B-16, ViT-L-14), or build the ResNet with MODEL.BACKBONE.NAME "
            "build_clip_resnet_backbone (or build_clip_resnet_fpn_backbone)")
    if vision.get("timm_model_name") or vision.get("attentional_pool"):
        raise UnknownCLIPModelError(
            f"{what} has a timm or attention-pooled image tower, which the CLIP ViT backbone does not take: "
            f"use an open_clip VisionTransformer model (e.g. {', '.join(vit_model_names()[:6])}, ...)")


def build_visual_tower(model_name: str, config_file: str = ""):
    """open_clip ``ModifiedResNet`` (randomly initialised) and its model config."""
    cfg = get_clip_model_config(model_name, config_file)
    _check_resnet(cfg, model_name or config_file)
    # private open_clip API (no public builder of one tower); its only use besides the text tower's
    from open_clip.model import _build_vision_tower

    visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg["quick_gelu"])
    return visual, cfg


def build_vit_tower(model_name: str, config_file: str = "", model_config: Dict[str, Any] = None):
    """open_clip ``VisionTransformer`` (randomly initialised) and its model config, from a model
    name, a model-config file or a model-config dict (``model_config``, which wins)."""
    cfg = dict(model_config) if model_config is not None else get_clip_model_config(model_name, config_file)
    cfg.setdefault("quick_gelu", False)
    _check_vit(cfg, model_name or config_file or "the given model config")
    from open_clip.model import _build_vision_tower

    visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg["quick_gelu"])
    return visual, cfg


def build_text_tower(model_name: str, config_file: str = ""):
    """open_clip ``TextTransformer`` (randomly initialised) and its model config."""
    cfg = get_clip_model_config(model_name, config_file)
    # private open_clip API (no public builder of one tower); see build_visual_tower
    from open_clip.model import _build_text_tower

    text = _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], cfg["quick_gelu"])
    return text, cfg


def build_full_clip(model_name: str, config_file: str = ""):
    """A whole open_clip ``CLIP`` model (both towers, random weights)."""
    return build_clip_from_config(get_clip_model_config(model_name, config_file))


def build_clip_from_config(cfg: Dict[str, Any]):
    """A whole open_clip ``CLIP`` (random weights) from a model-config dict (the format of
    open_clip's ``model_configs/*.json``)."""
    from open_clip.model import CLIP

    return CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                quick_gelu=cfg.get("quick_gelu", False))


def model_key(model_name: str, config_file: str = "") -> Tuple[str, str]:
    """A stable identifier of the architecture (for caches)."""
    if config_file:
        with open(config_file) as f:
            return ("config", json.dumps(json.load(f), sort_keys=True))
    return ("name", model_name)
