"""A small CLIP trained from scratch on a tiny synthetic world: the loss falls, it learns
the image-caption pairs, and the checkpoint is an ordinary open_clip file the detector loads."""
import json
import os
import subprocess
import sys

import pytest
import torch

from regionclip_d2.config import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD
from regionclip_d2.synthetic.clip_data import load_split_pairs, preprocess
from regionclip_d2.synthetic.clip_eval import retrieval_top1
from regionclip_d2.synthetic.clip_training import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    load_world_clip,
    train_world_clip,
    world_clip_config,
)
from regionclip_d2.synthetic.world import generate_world, load_world

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def one_thread():
    # 2 shared cores: one thread avoids OpenMP spin contention with other processes
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("clipworld")
    world = str(root / "world")
    generate_world(world, num_train=32, num_val=16, num_test=0, image_size=96, seed=1)
    out = str(root / "clip")
    metrics = train_world_clip(world, out, steps=80, batch_size=16, seed=0, log_every=20, progress=False,
                               max_eval_images=16)
    return world, out, metrics


def test_loss_falls_and_pairs_are_learned(trained):
    world, out, m = trained
    assert m["loss_first"] > 2.0 and m["loss_last"] < 0.5 * m["loss_first"], m["loss_history"]
    images, captions, _ = load_split_pairs(world, "train", max_images=32)
    top1 = retrieval_top1(m["model"], images, [c[0] for c in captions], chunk=32)
    assert top1 > 0.4, top1  # chance 1/32
    assert 0.0 <= m["retrieval_top1"] <= 1.0 and m["retrieval_chance"] == 1 / 16
    zs = m["zero_shot"]
    assert zs["n"] > 0 and 0.0 <= zs["accuracy"] <= 1.0 and zs["chance"] == 1 / 14


def test_checkpoint_is_plain_open_clip_and_loads_into_detector_parts(trained):
    from regionclip_d2.checkpoint import load_clip_weights
    from regionclip_d2.modeling.backbone import CLIPResNet
    from regionclip_d2.modeling.clip_model import build_full_clip, build_visual_tower
    from regionclip_d2.modeling.text import build_language_encoder

    world, out, m = trained
    ckpt, cfg_json = os.path.join(out, CHECKPOINT_NAME), os.path.join(out, CONFIG_NAME)
    with open(cfg_json) as f:
        cfg = json.load(f)
    assert cfg == world_clip_config(96) and set(cfg) == {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    ref = m["model"].state_dict()
    assert set(sd) == set(ref)
    assert all(torch.equal(sd[k], ref[k].float()) for k in sd)

    full = build_full_clip("", cfg_json)
    full.load_state_dict(sd)  # strict
    visual, _ = build_visual_tower("", cfg_json)
    backbone = CLIPResNet(visual, out_features=["res4"])
    lang = build_language_encoder("", cfg_json)
    load_clip_weights(ckpt, backbone=backbone, lang_encoder=lang)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, sd["visual." + k]), k
    for k, v in lang.state_dict().items():
        assert torch.equal(v, sd[k]), k

    # the detector's parts compute what the trained CLIP computes (same preprocessing)
    images, captions, _ = load_split_pairs(world, "val", max_images=4)
    model, _ = load_world_clip(out)
    with torch.no_grad():
        x = preprocess(images)
        torch.testing.assert_close(backbone.encode_image(x), model.encode_image(x), atol=1e-4, rtol=1e-4)
        texts = [c[0] for c in captions]
        torch.testing.assert_close(lang(lang.tokenize(texts)), model.encode_text(lang.tokenize(texts)),
                                   atol=1e-4, rtol=1e-4)


def test_metrics_file_records_the_world(trained):
    world, out, m = trained
    with open(os.path.join(out, METRICS_NAME)) as f:
        saved = json.load(f)
    assert saved["world_fingerprint"] == load_world(world)["fingerprint"]
    assert saved["steps"] == 80 and saved["loss_history"][-1]["step"] == 80 and "model" not in saved
    assert {"accuracy", "accuracy_base", "accuracy_novel", "per_class"} <= set(saved["zero_shot"])


def test_preprocess_matches_recognition_branch():
    img = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    want = (img.float() / 255 - torch.tensor(CLIP_PIXEL_MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(CLIP_PIXEL_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess(img), want)
    assert preprocess(img, channels_last=True).is_contiguous(memory_format=torch.channels_last)


def test_world_clip_uses_the_library_loss_with_a_learned_temperature():
    from regionclip_d2.modeling.losses import image_text_contrastive_loss

    f = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    assert image_text_contrastive_loss(f, f, tau=1.0 / torch.tensor(100.0)) < 1e-3
    flat = image_text_contrastive_loss(f, f, tau=1.0 / torch.tensor(0.0).exp() / 1e9)
    assert flat < 1e-3  # a huge scale: perfect pairs cost nothing
    scale = torch.tensor(0.0, requires_grad=True)  # log scale, as open_clip stores it
    loss = image_text_contrastive_loss(f, torch.randn(8, 16), tau=1.0 / scale.exp())
    loss.backward()
    assert scale.grad is not None and scale.grad.abs() > 0  # the temperature learns through the loss
    torch.testing.assert_close(image_text_contrastive_loss(f, f, tau=torch.tensor(float("inf"))),
                               torch.log(torch.tensor(8.0)))


class _Stub(torch.nn.Module):
    """Image i embeds as e_i; text "t<k>" embeds as e_k: retrieval is fully controlled."""

    context_length = 8

    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Conv2d(3, 1, 1)

    def encode_image(self, x, normalize=True):
        return torch.eye(4)[torch.floor(x[:, 0, 0, 0].float() + 2).long().clamp(0, 3)]

    def encode_text(self, tokens, normalize=True):
        return torch.eye(4)[tokens[:, 0]]


def test_retrieval_counts_identical_caption_text_as_correct():
    mean, std = torch.tensor(CLIP_PIXEL_MEAN[0]), torch.tensor(CLIP_PIXEL_STD[0])
    # pixel values chosen so that the preprocessed first pixel is -1.5, -0.5, 0.5, 0.5: images embed
    # as e_0, e_1, e_2, e_2
    vals = [int(round(float(((k - 1.5) * std + mean) * 255))) for k in (0, 1, 2, 2)]
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    for i, v in enumerate(vals):
        images[i, 0, 0, 0] = v

    def tok(texts):
        return torch.tensor([[int(t[1:])] for t in texts])

    # image 3 retrieves caption 2 (a tie, first wins), whose text equals its own caption 3: correct
    assert retrieval_top1(_Stub(), images, ["t0", "t1", "t2", "t2"], tokenizer=tok) == 1.0
    assert retrieval_top1(_Stub(), images, ["t1", "t0", "t2", "t2"], tokenizer=tok) == 0.5
    assert retrieval_top1(_Stub(), images, ["t1", "t0", "t2", "t2"], tokenizer=tok, chunk=2) == 0.5
    with pytest.raises(ValueError, match="one caption per image"):
        retrieval_top1(_Stub(), images, ["t0"], tokenizer=tok)


def test_cli(trained, tmp_path):
    world, _, _ = trained
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "tools/train_world_clip.py", "--world-dir", world, "--output-dir", str(out),
                        "--steps", "3", "--batch-size", "8", "--eval-split", "none", "--threads", "1",
                        "--no-progress"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / CHECKPOINT_NAME).is_file() and (out / CONFIG_NAME).is_file()
    assert json.loads(r.stdout[:r.stdout.rindex("}") + 1])["steps"] == 3
    r = subprocess.run([sys.executable, "tools/train_world_clip.py", "--world-dir", str(tmp_path / "nowhere"),
                        "--output-dir", str(out)], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "make_synthetic_ovd.py" in r.stderr


def test_random_zoom_crops_and_keeps_size():
    from regionclip_d2.synthetic.clip_training import random_zoom

    g = torch.Generator().manual_seed(0)
    # a horizontal ramp: a zoomed crop spans a narrower range of values than the whole image
    ramp = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(6, 3, 64, 64).contiguous()
    out = random_zoom(ramp, prob=1.0, min_scale=0.5, generator=g)
    assert out.shape == ramp.shape
    spans = (out[:, 0, 0, -1] - out[:, 0, 0, 0])
    assert (spans < 0.99).all() and (spans > 0.45).all()
    assert torch.equal(random_zoom(ramp, prob=0.0, min_scale=0.5, generator=g), ramp)
    many = ramp[:1].expand(40, 3, 64, 64).contiguous()
    kept = random_zoom(many, prob=0.5, min_scale=0.5, generator=torch.Generator().manual_seed(0))
    same = sum((kept[i] == many[i]).all().item() for i in range(40))
    assert 8 <= same <= 32  # about half are left as they are


def test_bf16_is_used_only_where_the_cpu_has_it(monkeypatch, tmp_path):
    import builtins

    from regionclip_d2.synthetic import clip_training

    real_open = builtins.open
    for flags, expected in (("fpu avx2 avx512f", False), ("fpu avx512f avx512_bf16", True), ("amx_bf16", True)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"flags\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p,
                                                                           *a, **k))
        assert clip_training.cpu_has_fast_bf16() is expected
        monkeypatch.setattr(builtins, "open", real_open)


def test_world_clip_config_with_a_vit_image_tower():
    """patch_size makes the image tower a ViT (what CLIPSelf trains): open_clip builds it, and the
    CLIPSelf backbone takes it with its [CLS] path equal to open_clip's encode_image."""
    from regionclip_d2.modeling.backbone.clip_vit import CLIPViT
    from regionclip_d2.modeling.clip_model import build_clip_from_config

    cfg = world_clip_config(96, patch_size=8, vision_width=32, vision_layers=2, embed_dim=16)
    assert cfg["vision_cfg"] == {"image_size": 96, "width": 32, "layers": 2, "patch_size": 8, "head_width": 32}
    assert world_clip_config(96, patch_size=8, vision_width=64, vision_layers=(3,))["vision_cfg"]["layers"] == 3
    torch.manual_seed(0)
    model = build_clip_from_config(cfg).eval()
    vit = CLIPViT(model.visual)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(vit.encode_image(x), model.encode_image(x), atol=1e-5, rtol=1e-5)
        assert vit(x)["dense"].shape == (2, 16, 12, 12)
    with pytest.raises(ValueError, match="patch_size=7 must divide image_size=96"):
        world_clip_config(96, patch_size=7)
    with pytest.raises(ValueError, match="vision_width=40 must be a multiple of head_width=32"):
        world_clip_config(96, patch_size=8, vision_width=40)
    with pytest.raises(ValueError, match="a ViT image tower takes one number of blocks"):
        world_clip_config(96, patch_size=8, vision_layers=(1, 1))
    with pytest.raises(ValueError, match="multiple of 32"):
        world_clip_config(80)  # the ResNet tower's attention pool
