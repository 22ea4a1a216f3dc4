"""SOLVER.OPTIMIZER: detectron2's SGD by default, AdamW on request, a clear error otherwise."""
import pytest
import torch
from helpers import tiny_cfg, tiny_model

from regionclip_d2.engine.trainer import RegionCLIPTrainer

C4 = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_ovd.yaml"


@pytest.mark.parametrize("name, kind", [("SGD", torch.optim.SGD), ("ADAMW", torch.optim.AdamW),
                                        ("adamw", torch.optim.AdamW)])
def test_optimizer_choice(tiny_clip_config, name, kind):
    cfg = tiny_cfg(C4, tiny_clip_config, extra=["SOLVER.OPTIMIZER", name, "SOLVER.BASE_LR", 0.01,
                                                 "SOLVER.WEIGHT_DECAY", 0.001])
    model = tiny_model(C4, tiny_clip_config)
    opt = RegionCLIPTrainer.build_optimizer(cfg, model)
    assert isinstance(opt, kind)
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert params == trainable  # frozen parts (RPN branch, text encoder, stem) are not optimised
    assert all(g["lr"] == pytest.approx(0.01) for g in opt.param_groups)


def test_unknown_optimizer(tiny_clip_config):
    cfg = tiny_cfg(C4, tiny_clip_config, extra=["SOLVER.OPTIMIZER", "LION"])
    with pytest.raises(ValueError, match="SGD or ADAMW"):
        RegionCLIPTrainer.build_optimizer(cfg, tiny_model(C4, tiny_clip_config))
