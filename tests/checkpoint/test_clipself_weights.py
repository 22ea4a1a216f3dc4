"""Weights of the CLIP ViT backbone and of CLIPSelf / F-ViT: OpenAI, OpenCLIP and CLIPSelf checkpoint
layouts with the official key names (tiny open_clip ViTs built in-process), ``tools/convert_weights.py
--format clipself``, the real models' key names and shapes (built on the meta device), and the errors.

Tolerance of the [CLS] path against open_clip's ``encode_image`` at the native input size: 1e-5
(absolute and relative; the same float32 operations, in the same order up to the batch layout)."""
import copy
import json
import logging
import os
import sys

import pytest
import torch
from conftest import TINY_VIT
from helpers import tiny_model

from detectron2.modeling import build_model

from regionclip_d2 import get_regionclip_cfg
from regionclip_d2.checkpoint import CheckpointFormatError, RegionCLIPCheckpointer, load_clip_weights
from regionclip_d2.checkpoint.loading import check_compatible, openclip_vit_names, vit_tower_shape
from regionclip_d2.modeling.backbone.clip_vit import CLIPViT
from regionclip_d2.modeling.clip_model import build_clip_from_config, build_vit_tower, get_clip_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIPSELF = "configs/clipself/CLIPSelf_ViT-B-16.yaml"
FVIT = "configs/clipself/FViT_ViT-B-16_ovd.yaml"
C4_GT = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml"
TOL = dict(atol=1e-5, rtol=1e-5)
EXACT = dict(atol=0, rtol=0)
LAYOUTS = ["raw", "state_dict", "module", "visual_only", "torchscript"]


def perturbed(model, seed, prefix=""):
    """``model`` with every parameter under ``prefix`` moved by seeded noise (open_clip starts
    biases at 0 and LayerNorms at 1/0; distinct values make the equality checks meaningful)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(prefix):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def source_clip(config=TINY_VIT, seed=1):
    torch.manual_seed(seed)
    return perturbed(build_clip_from_config(config), seed)


def finetuned(clip, seed=2):
    """A CLIPSelf-like fine-tune of ``clip``: the image tower moved, the text tower as it was."""
    return perturbed(copy.deepcopy(clip), seed, prefix="visual.")


def write(clip, layout, path):
    """``clip`` saved in one checkpoint layout; returns ``path``."""
    sd = {k: v.clone() for k, v in clip.state_dict().items()}
    if layout == "raw":  # OpenAI / OpenCLIP state dict
        obj = sd
    elif layout == "state_dict":  # the official CLIPSelf training checkpoint (open_clip's training code)
        twin = copy.deepcopy(clip).train()
        opt = torch.optim.AdamW(twin.parameters(), lr=1e-5, weight_decay=0.1)
        twin.encode_image(torch.randn(2, 3, 32, 32)).square().sum().backward()
        opt.step()
        obj = {"epoch": 6, "name": "clipself_coco_6_save6", "state_dict": sd, "optimizer": opt.state_dict()}
    elif layout == "module":  # saved from a DistributedDataParallel wrapper
        obj = {"epoch": 6, "name": "ddp", "state_dict": {"module." + k: v for k, v in sd.items()}}
    elif layout == "visual_only":  # the image tower alone, its own key names
        obj = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    elif layout == "torchscript":  # OpenAI's .pt files are TorchScript archives with CLIP's key names
        class Holder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                for name, child in clip.named_children():
                    self.add_module(name, copy.deepcopy(child))
                for name, p in clip.named_parameters(recurse=False):
                    self.register_parameter(name, torch.nn.Parameter(p.detach().clone()))

            def forward(self, x):
                return x + self.logit_scale

        torch.jit.trace(Holder(), torch.zeros(1)).save(str(path))
        return str(path)
    else:
        raise ValueError(layout)
    torch.save(obj, path)
    return str(path)


def config_file(tmp_path, name="tiny_vit.json", config=TINY_VIT, **vision):
    cfg = copy.deepcopy(config)
    cfg["vision_cfg"].update(vision)
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def clipself_model(vit_config, *extra):
    torch.manual_seed(0)
    return build_model(get_regionclip_cfg(CLIPSELF, ["MODEL.CLIP.OPENCLIP_MODEL_CONFIG", vit_config,
                                                     "MODEL.DEVICE", "cpu"] + list(extra))).eval()


def fvit_model(vit_config, *extra):
    return tiny_model(FVIT, vit_config, extra=["MODEL.CLIP.TEXT_EMB_DIM", 24] + list(extra))


def assert_tower(vit, clip):
    """Every weight of the backbone equals the source's image tower; the [CLS] path equals
    open_clip's encode_image at the native 32 px."""
    ref = clip.state_dict()
    got = vit.state_dict()
    assert set(got) == {k[len("visual."):] for k in ref if k.startswith("visual.")}
    for k, v in got.items():
        torch.testing.assert_close(v, ref["visual." + k], **EXACT)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(vit.encode_image(x), clip.encode_image(x), **TOL)


def assert_text(lang_encoder, clip):
    ref = clip.state_dict()
    for k, v in lang_encoder.state_dict().items():
        torch.testing.assert_close(v, ref[k], **EXACT)


def convert(capsys, *argv):
    """tools/convert_weights.py in-process: (exit code, stdout, stderr)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from convert_weights import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- loading, every layout
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_load_into_the_vit_student_and_teacher(layout, tiny_vit_config, tmp_path):
    clip = source_clip()
    path = write(clip, layout, tmp_path / f"{layout}.pt")
    # MODEL.CLIP.CLIP_WEIGHTS: the student, and the teacher copied from it
    model = clipself_model(tiny_vit_config, "MODEL.CLIP.CLIP_WEIGHTS", path)
    assert_tower(model.backbone, clip)
    assert_tower(model.teacher_backbone, clip)
    # MODEL.WEIGHTS through the checkpointer: the same file maps onto both
    model = clipself_model(tiny_vit_config)
    RegionCLIPCheckpointer(model).load(path)
    assert_tower(model.backbone, clip)
    assert_tower(model.teacher_backbone, clip)


def test_full_model_file_into_the_image_tower_logs_the_text_tower(tiny_vit_config, tmp_path, caplog):
    path = write(source_clip(), "raw", tmp_path / "full.pt")
    bb = CLIPViT(build_vit_tower("", model_config=TINY_VIT)[0])
    with caplog.at_level(logging.INFO, logger="regionclip_d2.checkpoint.loading"):
        load_clip_weights(path, backbone=bb)
    assert "text tower (17 tensors) is not loaded" in caplog.text


def test_bare_resnet_tower(tiny_clip, tiny_clip_config, tmp_path):
    """The bare-tower layout holds for the CLIP ResNets too."""
    path = tmp_path / "rn_visual.pt"
    torch.save({k[len("visual."):]: v for k, v in tiny_clip.state_dict().items() if k.startswith("visual.")}, path)
    model = tiny_model(C4_GT, tiny_clip_config)
    load_clip_weights(str(path), backbone=model.backbone)
    ref = tiny_clip.state_dict()
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, ref["visual." + k], **EXACT)


def test_openai_weights_need_the_quickgelu_config(tmp_path):
    """The keys cannot tell QuickGELU (OpenAI's ViTs) from GELU: both configs load the file, only
    the matching one reproduces the embedding (hence ViT-B-16-quickgelu for OpenAI's ViT-B/16)."""
    quick = dict(copy.deepcopy(TINY_VIT), quick_gelu=True)
    clip = source_clip(quick)
    path = write(clip, "raw", tmp_path / "openai.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for config, same in ((quick, True), (TINY_VIT, False)):
            bb = CLIPViT(build_vit_tower("", model_config=config)[0]).eval()
            load_clip_weights(path, backbone=bb)
            diff = (bb.encode_image(x) - clip.encode_image(x)).abs().max().item()
            assert (diff < 1e-5) == same, diff


# ---------------------------------------------------------------- convert_weights.py --format clipself
@pytest.mark.parametrize("layout", ["raw", "state_dict", "module", "visual_only"])
def test_convert_clipself_checkpoint_for_fvit(layout, tiny_vit_config, tmp_path, capsys):
    """The fine-tuned image tower becomes backbone.bottom_up.* alone; the F-ViT detector takes
    it as MODEL.WEIGHTS over the original CLIP (MODEL.CLIP.CLIP_WEIGHTS: ViT and text tower)."""
    original = source_clip()
    student = finetuned(original)
    src = write(student, layout, tmp_path / f"clipself_{layout}.pt")
    out = tmp_path / "fvit_vit.pth"
    code, stdout, err = convert(capsys, "--format", "clipself", "--input", src, "--output", out, "--config-file", FVIT,
                                "--opts", "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_vit_config,
                                "MODEL.CLIP.TEXT_EMB_DIM", 24)
    assert code == 0, err
    assert "verified" in stdout and "backbone.bottom_up.*" in stdout
    assert ("text tower (17 tensors) is not written" in stdout) == (layout != "visual_only")
    data = torch.load(out, weights_only=True)
    assert data["source_format"] == "clipself"
    assert all(k.startswith("backbone.bottom_up.") for k in data["model"])
    clip_file = write(original, "raw", tmp_path / "original.pt")
    det = fvit_model(tiny_vit_config, "MODEL.CLIP.CLIP_WEIGHTS", clip_file, "MODEL.WEIGHTS", str(out))
    RegionCLIPCheckpointer(det).load(str(out))
    assert_tower(det.backbone.bottom_up, student)
    assert_text(det.lang_encoder, original)


def test_convert_clipself_checkpoint_for_clipself(tiny_vit_config, tmp_path, capsys):
    """For the CLIPSelf config the student alone is written (backbone.*): the teacher stays the
    original CLIP of MODEL.CLIP.CLIP_WEIGHTS."""
    original = source_clip()
    student = finetuned(original)
    src = write(student, "state_dict", tmp_path / "epoch_6.pt")
    out = tmp_path / "student.pth"
    code, stdout, err = convert(capsys, "--format", "clipself", "--input", src, "--output", out, "--config-file",
                                CLIPSELF, "--opts", "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_vit_config)
    assert code == 0, err
    assert "only the student (backbone.*) is written" in stdout
    data = torch.load(out, weights_only=True)
    assert data["model"] and all(k.startswith("backbone.") for k in data["model"])
    model = clipself_model(tiny_vit_config, "MODEL.CLIP.CLIP_WEIGHTS", write(original, "raw", tmp_path / "o.pt"))
    RegionCLIPCheckpointer(model).load(str(out))
    assert_tower(model.backbone, student)
    assert_tower(model.teacher_backbone, original)


def test_convert_regionclip_d2_clipself_checkpoint(tiny_vit_config, tmp_path, capsys):
    """This project's own CLIPSelf checkpoint (backbone.* student, teacher_backbone.*): the student
    goes to the F-ViT ViT."""
    original = source_clip()
    student = finetuned(original)
    model = clipself_model(tiny_vit_config, "MODEL.CLIP.CLIP_WEIGHTS", write(original, "raw", tmp_path / "o.pt"))
    model.backbone.load_state_dict({k[len("visual."):]: v for k, v in student.state_dict().items()
                                    if k.startswith("visual.")})
    src = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "iteration": 10}, src)
    out = tmp_path / "fvit_vit.pth"
    code, _, err = convert(capsys, "--format", "clipself", "--input", src, "--output", out, "--config-file", FVIT,
                           "--opts", "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_vit_config, "MODEL.CLIP.TEXT_EMB_DIM", 24)
    assert code == 0, err
    det = fvit_model(tiny_vit_config)
    RegionCLIPCheckpointer(det).load(str(out))
    assert_tower(det.backbone.bottom_up, student)


# ---------------------------------------------------------------- the real models' key names and shapes
def openai_visual_keys(layers):
    """The image-tower key names of OpenAI's CLIP ViTs (clip/model.py VisionTransformer), written out."""
    keys = {"conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias",
            "ln_post.weight", "ln_post.bias", "proj"}
    for i in range(layers):
        for k in ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
                  "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
                  "mlp.c_proj.bias", "ln_2.weight", "ln_2.bias"):
            keys.add(f"transformer.resblocks.{i}.{k}")
    return keys


def meta_vit(name):
    with torch.device("meta"):
        return CLIPViT(build_vit_tower(name)[0])


REAL = {"ViT-B-32": (12, 50, 7, 32, 224), "ViT-B-16": (12, 197, 14, 16, 224), "ViT-L-14": (24, 257, 16, 14, 224),
        "ViT-L-14-336": (24, 577, 24, 14, 336)}


@pytest.mark.parametrize("name", list(REAL))
def test_real_vits_have_openai_key_names_and_are_recognised(name):
    bb = meta_vit(name)
    layers, positions, grid, patch, size = REAL[name]
    assert set(bb.state_dict()) == openai_visual_keys(layers)
    shape = vit_tower_shape(bb.state_dict())
    assert (shape["layers"], shape["positions"], shape["grid"], shape["patch"]) == (layers, positions, grid, patch)
    assert openclip_vit_names(shape)[0] == name and f"{name}-quickgelu" in openclip_vit_names(shape)
    assert get_clip_model_config(name)["vision_cfg"]["image_size"] == size


@pytest.mark.parametrize("file_name,config_name,expected", [
    ("ViT-B-16", "ViT-B-32", "positional embedding has 197 tokens (14x14 patches of 16 px: ViT-B-16 at 224 px) but "
                             "the config builds 50 tokens (7x7 patches of 32 px: ViT-B-32 at 224 px); 16 px patches "
                             "but the config builds 32 px patches. To load it, set MODEL.CLIP.OPENCLIP_MODEL ViT-B-16 "
                             "(ViT-B-16-quickgelu for OpenAI's weights, which use QuickGELU)"),
    ("ViT-L-14-336", "ViT-L-14", "positional embedding has 577 tokens (24x24 patches of 14 px: ViT-L-14-336 at 336 px) "
                                 "but the config builds 257 tokens (16x16 patches of 14 px: ViT-L-14 at 224 px). To "
                                 "load it, set MODEL.CLIP.OPENCLIP_MODEL ViT-L-14-336"),
    ("ViT-L-14", "ViT-B-16", "width 1024 but the config builds width 768"),
], ids=["B16-file-B32-config", "L14-336-file-L14-config", "L14-file-B16-config"])
def test_real_vit_mismatch_names_the_model_config(file_name, config_name, expected):
    file_sd = {"backbone." + k: v for k, v in meta_vit(file_name).state_dict().items()}
    holder = torch.nn.Module()
    holder.backbone = meta_vit(config_name)
    with pytest.raises(CheckpointFormatError) as e:
        check_compatible(file_sd, holder, "'epoch_6.pt'")
    assert expected in str(e.value)
    assert str(e.value).startswith("'epoch_6.pt': its CLIP ViT image tower is not the one the config builds for "
                                   "backbone: ")


# ---------------------------------------------------------------- errors
def test_unknown_layout(tiny_vit_config, tmp_path, capsys):
    path = tmp_path / "x.pt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointFormatError, match="unknown checkpoint format.*image tower alone"):
        clipself_model(tiny_vit_config, "MODEL.CLIP.CLIP_WEIGHTS", str(path))
    code, _, err = convert(capsys, "--format", "clipself", "--input", path, "--output", tmp_path / "o.pth",
                           "--config-file", CLIPSELF, "--opts", "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_vit_config)
    assert code == 2 and "convert_weights: error: unknown checkpoint format" in err
    assert not (tmp_path / "o.pth").exists()


def test_missing_keys(tiny_vit_config, tmp_path, capsys):
    sd = {k: v for k, v in source_clip().state_dict().items()
          if not k.startswith("visual.transformer.resblocks.1.mlp.")}
    path = tmp_path / "partial.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointFormatError, match=r"lacks 4 of its weights .*transformer\.resblocks\.1\.mlp"):
        clipself_model(tiny_vit_config, "MODEL.CLIP.CLIP_WEIGHTS", str(path))
    code, _, err = convert(capsys, "--format", "clipself", "--input", path, "--output", tmp_path / "o.pth",
                           "--config-file", CLIPSELF, "--opts", "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_vit_config)
    assert code == 2 and "lacks 4 of its weights" in err


def test_other_tiny_architecture_is_named(tmp_path, capsys):
    """A file of another input size (17 positions: 4x4 patches at 32 px) or depth than the config:
    no open_clip model has the tiny tower, so the error gives the model config to write. A deeper
    file is an error too, not a partial load."""
    path = write(source_clip(), "raw", tmp_path / "tiny32.pt")
    size48 = config_file(tmp_path, "tiny48.json", image_size=48)
    with pytest.raises(CheckpointFormatError) as e:
        clipself_model(size48, "MODEL.CLIP.CLIP_WEIGHTS", path)
    assert ("positional embedding has 17 tokens (4x4 patches of 8 px: a 32 px input) but the config builds 37 tokens "
            "(6x6 patches of 8 px: a 48 px input). No open_clip model has this tower: to load it, give "
            "MODEL.CLIP.OPENCLIP_MODEL_CONFIG a model config with embed_dim 24 and vision_cfg width 32, layers 2, "
            "patch_size 8, image_size 32") in str(e.value)
    deep = write(source_clip(dict(copy.deepcopy(TINY_VIT), vision_cfg=dict(TINY_VIT["vision_cfg"], layers=3))), "raw",
                 tmp_path / "deep.pt")
    code, _, err = convert(capsys, "--format", "clipself", "--input", deep, "--output", tmp_path / "o.pth",
                           "--config-file", CLIPSELF, "--opts", "MODEL.CLIP.OPENCLIP_MODEL_CONFIG",
                           config_file(tmp_path))
    assert code == 2 and "3 transformer blocks but the config builds 2 transformer blocks" in err


EVA_CLIP = {"visual.cls_token": (1, 1, 32), "visual.pos_embed": (1, 17, 32), "visual.patch_embed.proj.weight":
            (32, 3, 8, 8), "visual.blocks.0.attn.q_proj.weight": (32, 32), "visual.blocks.0.attn.v_bias": (32,),
            "visual.blocks.0.mlp.w1.weight": (64, 32), "visual.rope.freqs_cos": (16, 8), "visual.head.weight": (24, 32),
            "text.transformer.resblocks.0.ln_1.weight": (32,), "logit_scale": ()}
OPENCLIP_TIMM = {"visual.trunk.cls_token": (1, 1, 32), "visual.trunk.pos_embed": (1, 17, 32),
                 "visual.trunk.patch_embed.proj.weight": (32, 3, 8, 8), "visual.trunk.blocks.0.attn.q_proj.weight":
                 (32, 32), "visual.head.proj.weight": (24, 32), "text.token_embedding.weight": (100, 32)}


@pytest.mark.parametrize("keys,what", [(EVA_CLIP, "an EVA-CLIP image tower"),
                                       (OPENCLIP_TIMM, "an open_clip timm image tower")], ids=["eva-clip", "timm"])
@pytest.mark.parametrize("visual_only", [False, True], ids=["full", "visual-only"])
def test_eva02_towers_are_refused(keys, what, visual_only, tiny_vit_config, tmp_path, capsys):
    sd = {k: torch.zeros(s) for k, s in keys.items()}
    if visual_only:
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    path = tmp_path / "eva.pt"
    torch.save({"epoch": 6, "name": "eva", "state_dict": sd}, path)
    with pytest.raises(CheckpointFormatError, match=f"holds {what}.*EVA02 towers .* are not implemented"):
        clipself_model(tiny_vit_config, "MODEL.CLIP.CLIP_WEIGHTS", str(path))
    with pytest.raises(CheckpointFormatError, match=f"holds {what}"):
        RegionCLIPCheckpointer(clipself_model(tiny_vit_config)).load(str(path))
    code, _, err = convert(capsys, "--format", "clipself", "--input", path, "--output", tmp_path / "o.pth",
                           "--config-file", FVIT, "--opts", "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_vit_config,
                           "MODEL.CLIP.TEXT_EMB_DIM", 24)
    assert code == 2 and what in err and "cannot be loaded" in err


def test_wrong_tower_or_config(tiny_clip, tiny_clip_config, tiny_vit_config, tmp_path, capsys):
    # a CLIP ResNet file into the ViT
    rn = tmp_path / "rn.pt"
    torch.save(tiny_clip.state_dict(), rn)
    code, _, err = convert(capsys, "--format", "clipself", "--input", rn, "--output", tmp_path / "o.pth",
                           "--config-file", CLIPSELF, "--opts", "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_vit_config)
    assert code == 2 and "holds a CLIP ResNet image tower but the backbone is a CLIP ViT" in err
    # --format clipself with a config that builds no ViT
    vit = write(source_clip(), "raw", tmp_path / "vit.pt")
    code, _, err = convert(capsys, "--format", "clipself", "--input", vit, "--output", tmp_path / "o.pth",
                           "--config-file", C4_GT, "--opts", "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config,
                           "MODEL.CLIP.TEXT_EMB_DIM", 64, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 4)
    assert code == 2 and "not a CLIP ViT: use configs/clipself/CLIPSelf_ViT-B-16.yaml" in err
    # an image tower alone where the text tower is needed too (F-ViT's MODEL.CLIP.CLIP_WEIGHTS)
    visual = write(source_clip(), "visual_only", tmp_path / "visual.pt")
    with pytest.raises(CheckpointFormatError, match="has no text tower weights: it holds an image tower only.*"
                                                    "--format clipself"):
        fvit_model(tiny_vit_config, "MODEL.CLIP.CLIP_WEIGHTS", visual)

