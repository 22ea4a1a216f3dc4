"""Config keys kept for the official yaml files must agree with what the model does."""
import pytest

from regionclip_d2 import get_regionclip_cfg
from regionclip_d2.config import check_config


def test_official_pretrain_yamls_pass_and_share_a_base():
    for name, model, depth in (("RegionCLIP_RN50", "RN50-quickgelu", 50),
                               ("RegionCLIP_RN50x4", "RN50x4-quickgelu", 200)):
        cfg = get_regionclip_cfg(f"configs/pretrain/{name}.yaml")
        assert cfg.MODEL.CLIP.OPENCLIP_MODEL == model and cfg.MODEL.CLIP.TEACHER_RESNETS_DEPTH == depth
        assert cfg.SOLVER.MAX_ITER == 600000  # RN50x4 inherits the schedule from the RN50 file
        check_config(cfg)


def test_teacher_depth_that_disagrees_with_the_teacher_is_an_error():
    cfg = get_regionclip_cfg("configs/pretrain/RegionCLIP_RN50x4.yaml", ["MODEL.CLIP.TEACHER_RESNETS_DEPTH", 50])
    with pytest.raises(ValueError, match="TEACHER_RESNETS_DEPTH 50 does not match the teacher RN50x4"):
        check_config(cfg)
    # naming the teacher makes the flag agree
    cfg.merge_from_list(["MODEL.CLIP.TEACHER_OPENCLIP_MODEL", "RN50-quickgelu"])
    check_config(cfg)


def test_non_text_classifier_is_an_error_and_removed_keys_are_gone():
    cfg = get_regionclip_cfg(None, ["MODEL.CLIP.USE_TEXT_EMB_CLASSIFIER", False])
    with pytest.raises(ValueError, match="only the text-embedding classifier"):
        check_config(cfg)
    assert "PRETRAIN_ONLY_EOT" not in get_regionclip_cfg().MODEL.CLIP  # never read, so not offered
