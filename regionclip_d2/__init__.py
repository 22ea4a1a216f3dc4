"""regionclip_d2: RegionCLIP (region-based language-image pretraining) on stock detectron2.

Importing the package registers its components in detectron2's registries:
backbones ``build_clip_resnet_backbone`` / ``build_clip_resnet_fpn_backbone``, RoI heads
``CLIPRes5ROIHeads`` / ``CLIPStandardROIHeads``, meta-architecture ``CLIPFastRCNN``.
"""
import os

from .config import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD, add_regionclip_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS_DIR = os.path.join(REPO_ROOT, "configs")


def resolve_config_path(path: str) -> str:
    """A config path as given, else relative to the repository root (``configs/...``),
    else relative to ``configs/``."""
    for candidate in (path, os.path.join(REPO_ROOT, path), os.path.join(CONFIGS_DIR, path)):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"config file {path!r} not found (looked in the current folder, {REPO_ROOT} "
                            f"and {CONFIGS_DIR})")


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


from .checkpoint import RegionCLIPCheckpointer  # noqa: E402
from .data.vocabularies import load_vocabulary  # noqa: E402
from .modeling import backbone as _backbone  # noqa: E402,F401  (registration)
from .modeling import meta_arch as _meta_arch  # noqa: E402,F401  (registration)
from .modeling import roi_heads as _roi_heads  # noqa: E402,F401  (registration)
from .modeling.meta_arch import CLIPFastRCNN  # noqa: E402
from .modeling.text import embed_class_names  # noqa: E402

__all__ = ["add_regionclip_config", "get_regionclip_cfg", "resolve_config_path", "CLIPFastRCNN",
           "RegionCLIPCheckpointer", "embed_class_names", "load_vocabulary", "CLIP_PIXEL_MEAN",
           "CLIP_PIXEL_STD"]
