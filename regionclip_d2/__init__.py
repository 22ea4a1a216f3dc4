"""regionclip_d2: RegionCLIP (region-based language-image pretraining) on stock detectron2.

Importing the package registers its components in detectron2's registries:
backbones ``build_clip_resnet_backbone`` / ``build_clip_resnet_fpn_backbone`` /
``build_clip_vit_backbone`` / ``build_clip_vit_sfp_backbone``, RoI heads
``CLIPRes5ROIHeads`` / ``CLIPStandardROIHeads``, meta-architectures ``CLIPFastRCNN``,
``PretrainFastRCNN`` and ``CLIPSelf``.
"""
import os

from .config import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD, add_regionclip_config


def resolve_config_path(path: str) -> str:
    """A config path as given (absolute or relative to the current folder), else one of the
    configs shipped with the package (``configs/...``, or relative to ``configs/``)."""
    if os.path.isfile(path):
        return path
    from .model_zoo import CONFIGS_DIR, get_config_file

    try:
        return get_config_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path!r} not found (looked in the current folder and in the "
                                f"configs shipped with regionclip_d2, {CONFIGS_DIR})") from None


def get_regionclip_cfg(config_file: str = None, opts=None):
    """A detectron2 config with the RegionCLIP keys, merged from ``config_file`` and ``opts``."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_regionclip_config(cfg)
    if config_file:
        cfg.merge_from_file(resolve_config_path(config_file))
    if opts:
        cfg.merge_from_list(list(opts))
    return cfg


from .api import Detections, Detector, Exemplar  # noqa: E402
from .checkpoint import RegionCLIPCheckpointer  # noqa: E402
from .data.vocabularies import load_vocabulary  # noqa: E402
from .modeling import backbone as _backbone  # noqa: E402,F401  (registration)
from .modeling import meta_arch as _meta_arch  # noqa: E402,F401  (registration)
from .modeling import roi_heads as _roi_heads  # noqa: E402,F401  (registration)
from .modeling.meta_arch import CLIPFastRCNN  # noqa: E402
from .modeling.text import embed_class_names  # noqa: E402

__all__ = ["Detector", "Detections", "Exemplar", "add_regionclip_config", "get_regionclip_cfg", "resolve_config_path",
           "CLIPFastRCNN",
           "RegionCLIPCheckpointer", "embed_class_names", "load_vocabulary", "CLIP_PIXEL_MEAN",
           "CLIP_PIXEL_STD"]
