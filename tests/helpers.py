"""Shared builders for the tests: tiny configs and models, built in-process."""
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from regionclip_d2 import get_regionclip_cfg


def tiny_cfg(config_file, tiny_clip_config, vocabulary="cat,dog,ring", extra=()):
    """A repository config made tiny: the tiny CLIP, 4x4 RoIs (C4), a small vocabulary."""
    cfg = get_regionclip_cfg(config_file)
    opts = ["MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config, "MODEL.CLIP.TEXT_EMB_DIM", 64,
            "MODEL.DEVICE", "cpu", "MODEL.CLIP.PROMPT_TEMPLATES", "single"]
    if vocabulary is not None:
        n = len(vocabulary.split(","))
        opts += ["MODEL.CLIP.VOCABULARY", vocabulary, "MODEL.ROI_HEADS.NUM_CLASSES", n]
        if cfg.MODEL.CLIP.OPENSET_TEST_NUM_CLASSES:
            opts += ["MODEL.CLIP.OPENSET_TEST_NUM_CLASSES", 0, "MODEL.CLIP.OPENSET_TEST_VOCABULARY", ""]
    if cfg.MODEL.ROI_HEADS.NAME == "CLIPRes5ROIHeads":
        opts += ["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 4]
    opts += list(extra)
    cfg.merge_from_list([str(o) for o in opts])
    return cfg


def tiny_model(*args, **kwargs):
    torch.manual_seed(0)
    return build_model(tiny_cfg(*args, **kwargs)).eval()


def image_input(h=96, w=128, boxes=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), "height": h, "width": w}
    if boxes is not None:
        d["instances"] = Instances((h, w), gt_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)),
                                   gt_classes=torch.zeros(len(boxes), dtype=torch.long))
    return d
