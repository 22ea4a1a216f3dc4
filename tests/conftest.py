import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# A tiny CLIP (open_clip architecture): ResNet image tower with one block per stage,
# width 16 (res4 has 256 channels, res5 512), 64 px input (attention pool on a native
# 2x2 grid, so RoIAlign 4x4 on res4 matches), text tower width 32, 2 layers.
TINY_CLIP = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}

# A tiny CLIP ViT (open_clip VisionTransformer): 32 px input, 8 px patches (a native 4x4 grid),
# width 32, 2 heads, 2 blocks, joint dimension 24.
TINY_VIT = {
    "embed_dim": 24,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1},
}


@pytest.fixture(autouse=True)
def _seed_and_cache(tmp_path, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setenv("REGIONCLIP_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny_clip_config(tmp_path):
    path = tmp_path / "tiny_clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


def randomize_batchnorm_stats(module, seed=0):
    """Give every BatchNorm non-trivial running statistics and affine params."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if hasattr(m, "running_mean") and m.running_mean is not None:
            n = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if getattr(m, "weight", None) is not None:
                with torch.no_grad():
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.fixture
def tiny_clip(tiny_clip_config):
    """A whole tiny open_clip CLIP model with non-trivial BN stats, in eval mode."""
    from regionclip_d2.modeling.clip_model import build_full_clip

    model = build_full_clip("", tiny_clip_config)
    randomize_batchnorm_stats(model.visual)
    return model.eval()


@pytest.fixture
def tiny_text_encoder(tiny_clip, tiny_clip_config):
    """The project's LanguageEncoder holding the tiny CLIP's text tower (same weights)."""
    from regionclip_d2.modeling.text import build_language_encoder

    enc = build_language_encoder("", tiny_clip_config)
    sd = {k: v for k, v in tiny_clip.state_dict().items() if not k.startswith(("visual.", "logit_scale"))}
    missing, unexpected = enc.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    return enc


@pytest.fixture
def tiny_vit_config(tmp_path):
    path = tmp_path / "tiny_vit.json"
    path.write_text(json.dumps(TINY_VIT))
    return str(path)
