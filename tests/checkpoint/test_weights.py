"""Weight formats: OpenAI TorchScript, OpenCLIP (state dict, training checkpoint,
safetensors), official RegionCLIP keys, detectron2 RPN files; and the errors."""
import os
import pickle
import subprocess
import sys

import pytest
import torch
from helpers import tiny_cfg, tiny_model

from detectron2.checkpoint import DetectionCheckpointer

from regionclip_d2.checkpoint import (
    CheckpointFormatError,
    RegionCLIPCheckpointer,
    detect_format,
    load_clip_weights,
    read_checkpoint,
)

C4_GT = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml"
C4_RPN = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml"
FPN_GT = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_FPN_zsinf_GT.yaml"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def clip_sd(tiny_clip):
    return {k: v.clone() for k, v in tiny_clip.state_dict().items()}


def assert_clip_arrived(model, tiny_clip, fpn=False):
    ref = tiny_clip.state_dict()
    bb = model.backbone.bottom_up if fpn else model.backbone
    for k, v in bb.state_dict().items():
        torch.testing.assert_close(v, ref["visual." + k], rtol=0, atol=0)
    for k, v in model.lang_encoder.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)


def test_openclip_state_dict_variants(tiny_clip, tiny_clip_config, tmp_path):
    sd = clip_sd(tiny_clip)
    files = {"plain.pth": sd,
             "train.pt": {"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    for name in ["plain.pth", "train.pt", "w.safetensors"]:
        model = tiny_model(C4_GT, tiny_clip_config)
        RegionCLIPCheckpointer(model).load(str(tmp_path / name))
        assert_clip_arrived(model, tiny_clip)


def test_openai_torchscript_archive(tiny_clip, tiny_clip_config, tmp_path):
    class Holder(torch.nn.Module):  # a TorchScript archive holding CLIP's keys, like OpenAI's .pt files
        def __init__(self, clip):
            super().__init__()
            for name, child in clip.named_children():
                self.add_module(name, child)
            for name, p in clip.named_parameters(recurse=False):
                self.register_parameter(name, p)

        def forward(self, x):
            return x + self.logit_scale

    path = tmp_path / "RN-tiny.pt"
    torch.jit.trace(Holder(tiny_clip), torch.zeros(1)).save(str(path))
    assert detect_format(read_checkpoint(str(path))) == "clip"
    model = tiny_model(C4_GT, tiny_clip_config)
    RegionCLIPCheckpointer(model).load(str(path))
    assert_clip_arrived(model, tiny_clip)


def test_clip_weights_into_fpn_and_via_config(tiny_clip, tiny_clip_config, tmp_path):
    path = tmp_path / "clip.pth"
    torch.save(clip_sd(tiny_clip), path)
    model = tiny_model(FPN_GT, tiny_clip_config)
    RegionCLIPCheckpointer(model).load(str(path))
    assert_clip_arrived(model, tiny_clip, fpn=True)
    # MODEL.CLIP.CLIP_WEIGHTS loads at construction
    model = tiny_model(C4_GT, tiny_clip_config, extra=["MODEL.CLIP.CLIP_WEIGHTS", str(path)])
    assert_clip_arrived(model, tiny_clip)


def official_state_dict(tiny_clip, model):
    """A state dict written with the official RegionCLIP key names."""
    sd = {}
    for k, v in tiny_clip.state_dict().items():
        if k.startswith("visual."):
            sd["backbone." + k[len("visual."):]] = v.clone()
        elif k != "logit_scale":
            sd["lang_encoder." + k] = v.clone()
    sd["roi_heads.box_predictor.cls_score.weight"] = torch.randn(65, 64)  # the official vocabulary
    sd["roi_heads.box_predictor.cls_bg_score.weight"] = torch.zeros(1, 64)
    sd["roi_heads.box_predictor.bbox_pred.weight"] = torch.randn(4, 64)
    sd["roi_heads.box_predictor.bbox_pred.bias"] = torch.randn(4)
    for k, v in model.state_dict().items():
        if k.startswith(("offline_backbone.", "offline_proposal_generator.")):
            sd[k] = torch.randn_like(v) if v.is_floating_point() else v.clone()
    return sd


def test_official_regionclip_checkpoint(tiny_clip, tiny_clip_config, tmp_path):
    model = tiny_model(C4_RPN, tiny_clip_config)
    sd = official_state_dict(tiny_clip, model)
    path = tmp_path / "official.pth"
    torch.save({"model": sd, "iteration": 600000}, path)
    RegionCLIPCheckpointer(model).load(str(path))
    assert_clip_arrived(model, tiny_clip)
    got = model.state_dict()
    for k in ("roi_heads.box_predictor.bbox_pred.weight", "offline_backbone.bottom_up.stem.conv1.weight",
              "offline_proposal_generator.rpn_head.conv.weight"):
        torch.testing.assert_close(got[k], sd[k], rtol=0, atol=0)


def test_official_checkpoint_through_plain_detectron2_checkpointer(tiny_clip, tiny_clip_config, tmp_path):
    """DefaultPredictor uses detectron2's own checkpointer: the model's load hook converts."""
    model = tiny_model(C4_GT, tiny_clip_config)
    path = tmp_path / "official.pth"
    torch.save({"model": official_state_dict(tiny_clip, model)}, path)
    DetectionCheckpointer(model).load(str(path))
    assert_clip_arrived(model, tiny_clip)


def test_convert_weights_round_trip(tiny_clip, tiny_clip_config, tmp_path):
    src = tmp_path / "openclip.pth"
    torch.save(clip_sd(tiny_clip), src)
    out = tmp_path / "converted.pth"
    r = subprocess.run([sys.executable, "tools/convert_weights.py", "--input", str(src), "--output", str(out),
                        "--config-file", C4_GT, "--opts", "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config,
                        "MODEL.CLIP.TEXT_EMB_DIM", "64", "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "4"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "verified" in r.stdout
    data = torch.load(out, weights_only=True)
    assert detect_format(data["model"]) == "regionclip"
    assert not any(k.startswith("offline_") for k in data["model"])  # no random RPN branch inside
    model = tiny_model(C4_GT, tiny_clip_config)
    DetectionCheckpointer(model).load(str(out))
    assert_clip_arrived(model, tiny_clip)


def test_shape_mismatch_names_keys_and_shapes(tiny_clip, tiny_clip_config, tmp_path):
    sd = clip_sd(tiny_clip)
    sd["visual.conv1.weight"] = torch.randn(4, 3, 3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    model = tiny_model(C4_GT, tiny_clip_config)
    with pytest.raises(CheckpointFormatError) as e:
        RegionCLIPCheckpointer(model).load(str(tmp_path / "bad.pth"))
    msg = str(e.value)
    assert "backbone.conv1.weight" in msg and "(4, 3, 3, 3)" in msg and "(8, 3, 3, 3)" in msg
    assert "MODEL.CLIP.OPENCLIP_MODEL" in msg


def test_missing_keys_are_an_error(tiny_clip, tiny_clip_config, tmp_path):
    sd = {k: v for k, v in clip_sd(tiny_clip).items() if not k.startswith("visual.layer3.")}
    torch.save(sd, tmp_path / "partial.pth")
    model = tiny_model(C4_GT, tiny_clip_config)
    with pytest.raises(CheckpointFormatError, match="lacks .* of its weights .*layer3"):
        RegionCLIPCheckpointer(model).load(str(tmp_path / "partial.pth"))
    with pytest.raises(CheckpointFormatError, match="lacks"):
        load_clip_weights(str(tmp_path / "partial.pth"), backbone=model.backbone)


def test_unknown_format(tiny_clip_config, tmp_path):
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "x.pth")
    model = tiny_model(C4_GT, tiny_clip_config)
    with pytest.raises(CheckpointFormatError, match="unknown checkpoint format"):
        RegionCLIPCheckpointer(model).load(str(tmp_path / "x.pth"))
    with pytest.raises(CheckpointFormatError, match="unknown checkpoint format"):
        load_clip_weights(str(tmp_path / "x.pth"), backbone=model.backbone)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_crafted_pickle_is_refused(tmp_path, tiny_clip_config, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"model": {"backbone.conv1.weight": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointFormatError, match="weights_only=True.*TRUST_CHECKPOINTS"):
        read_checkpoint(str(path))
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointFormatError, match="pickle file.*TRUST_CHECKPOINTS"):
        read_checkpoint(str(pkl))
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_truncated_or_corrupt_file_is_not_advised_to_be_trusted(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": {"backbone.conv1.weight": torch.ones(64, 3, 3, 3)}}, good)
    data = good.read_bytes()
    for name, content in (("truncated.pth", data[: len(data) // 2]), ("junk.pth", b"not a checkpoint at all")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointFormatError, match="truncated or corrupt.*Download or copy it again") as e:
            read_checkpoint(str(path))
        assert "TRUST" not in str(e.value), "a damaged file must never be advised to be trusted"
    # the file with an unsupported Python object names the object and does advise trust
    import argparse

    obj = tmp_path / "obj.pth"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, obj)
    with pytest.raises(CheckpointFormatError, match="argparse.Namespace.*TRUST_CHECKPOINTS"):
        read_checkpoint(str(obj))


def test_default_predictor_loads_weights_by_the_same_rules(tiny_clip_config, tmp_path, monkeypatch):
    """DefaultPredictor reads MODEL.WEIGHTS with detectron2's checkpointer; build_model checks the
    file first, so a pickle, a file of another architecture or a file without recognition weights
    fails before detectron2 opens it."""
    import json

    from detectron2.engine import DefaultPredictor

    monkeypatch.chdir(tmp_path)
    # 1. a .pkl is never unpickled unless trusted
    pkl = tmp_path / "model.pkl"
    pkl.write_bytes(pickle.dumps({"model": {"backbone.conv1.weight": _Evil()}}))
    with pytest.raises(CheckpointFormatError, match="pickle file.*TRUST_CHECKPOINTS"):
        DefaultPredictor(tiny_cfg(C4_RPN, tiny_clip_config, extra=["MODEL.WEIGHTS", str(pkl)]))
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    # 2. weights of another architecture (a wider image tower): an error naming keys and shapes
    wide = json.loads(open(tiny_clip_config).read())
    wide["vision_cfg"]["width"] = 32
    wide_cfg = tmp_path / "wide.json"
    wide_cfg.write_text(json.dumps(wide))
    DetectionCheckpointer(tiny_model(C4_RPN, str(wide_cfg)), str(tmp_path)).save("wide")
    with pytest.raises(CheckpointFormatError, match=r"wrong shape:\n  backbone\.\S+: checkpoint \(\d+"):
        DefaultPredictor(tiny_cfg(C4_RPN, tiny_clip_config, extra=["MODEL.WEIGHTS", str(tmp_path / "wide.pth")]))
    # 3. a file without the recognition branch and no CLIP_WEIGHTS: a random backbone is an error
    base = tiny_model(C4_RPN, tiny_clip_config)
    torch.save({"model": {k: v for k, v in base.state_dict().items() if k.startswith("offline_")}},
               tmp_path / "rpn_only.pth")
    with pytest.raises(CheckpointFormatError, match="no recognition-branch weights"):
        DefaultPredictor(tiny_cfg(C4_RPN, tiny_clip_config, extra=["MODEL.WEIGHTS", str(tmp_path / "rpn_only.pth")]))
    # the matching file loads
    DetectionCheckpointer(base, str(tmp_path)).save("good")
    DefaultPredictor(tiny_cfg(C4_RPN, tiny_clip_config, extra=["MODEL.WEIGHTS", str(tmp_path / "good.pth")]))
