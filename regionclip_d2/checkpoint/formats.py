"""Reading weight files and mapping their keys onto regionclip_d2 models.

Formats understood:
- OpenAI CLIP ``.pt`` (TorchScript archive) and plain state dicts of it;
- OpenCLIP checkpoints (state dict, ``{"state_dict": ...}`` training checkpoints, or
  ``.safetensors``), keys ``visual.*`` + text tower keys; CLIPSelf checkpoints of OpenAI /
  OpenCLIP ViTs are this format (``{"epoch", "name", "state_dict", "optimizer"}``);
- a bare CLIP image tower (the tower's own keys, no ``visual.`` prefix: a ViT's ``conv1.weight``,
  ``class_embedding``, ``positional_embedding``, ``transformer.resblocks.*``, ``proj``; a
  ResNet's ``layer1.*``, ``attnpool.*``), read as if its keys were under ``visual.``;
- official RegionCLIP and regionclip_d2 ``.pth`` (``{"model": state_dict}`` with
  detectron2-style keys ``backbone.*``, ``lang_encoder.*``, ``roi_heads.*``,
  ``offline_backbone.*``, ``offline_proposal_generator.*``, ``teacher_backbone.*``);
- detectron2 checkpoints of the RPN branch (``backbone.*``, ``proposal_generator.*``).

Refused with an error that says so: EVA-CLIP image towers (``visual.patch_embed.*``,
``visual.blocks.*``: the EVA02-CLIP layout of the official CLIPSelf code) and open_clip's timm
towers (``visual.trunk.*``, e.g. EVA02-*), which the CLIP backbones do not implement.

Every pickle-based read uses ``torch.load(weights_only=True)`` unless the caller
passes ``trusted=True``.
"""
import logging
import os
import zipfile
from typing import Dict, Tuple

import torch

logger = logging.getLogger(__name__)

# Text-tower keys of an OpenAI / OpenCLIP CLIP state dict (everything not under visual.*).
TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.",
                 "text_projection")
# Keys of official checkpoints that hold a vocabulary, not weights: the vocabulary is
# set by config or at run time, never taken from a weight file.
VOCABULARY_KEYS = ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.cls_bg_score.",
                   "roi_heads.box_predictor.test_cls_score.")


class CheckpointFormatError(ValueError):
    pass


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def read_checkpoint(path: str, trusted: bool = False) -> Dict:
    """Read a weight file into a dict (the checkpoint's top level, unwrapped only of
    TorchScript). Refuses files that need unpickling arbitrary objects unless ``trusted``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path, device="cpu"))
    if path.endswith(".pkl"):
        if not trusted:
            raise CheckpointFormatError(
                f"{path!r} is a pickle file, which can run code when loaded; regionclip_d2 loads it "
                "only if you trust it: set MODEL.CLIP.TRUST_CHECKPOINTS True (or pass --trust)")
        import pickle

        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
        if isinstance(data, dict) and "model" not in data and "blobs" in data:
            data = data["blobs"]
        return data
    if _is_torchscript(path):
        # OpenAI's original CLIP files: a TorchScript archive (no arbitrary pickle code).
        module = torch.jit.load(path, map_location="cpu")
        return {k: v for k, v in module.state_dict().items()}
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
        first = next((ln for ln in lines if "GLOBAL" in ln), lines[0])[:200]
        if not trusted and _needs_unpickling(e):
            raise CheckpointFormatError(
                f"{path!r} cannot be loaded with weights_only=True ({type(e).__name__}: {first}). It holds "
                "Python objects beyond tensors; load it only if you trust its source: set "
                "MODEL.CLIP.TRUST_CHECKPOINTS True (or pass --trust)") from e
        raise CheckpointFormatError(
            f"{path!r} ({os.path.getsize(path)} bytes) is not a readable checkpoint: it looks truncated or "
            f"corrupt ({type(e).__name__}: {first}). Download or copy it again and compare its size or "
            "checksum with the source's") from e


def _needs_unpickling(error: Exception) -> bool:
    """True when ``torch.load(weights_only=True)`` refused a well-formed file because it holds
    Python objects (an unsupported global), False for damaged files (truncated archives,
    bad pickle bytes), which trusting would not fix."""
    text = str(error)
    return "Weights only load failed" in text and "GLOBAL" in text


def unwrap_state_dict(data, source: str = "the checkpoint") -> Dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: ``data["model"]`` (detectron2),
    ``data["state_dict"]`` (OpenCLIP / CLIPSelf training), or ``data``; ``module.`` stripped;
    numpy arrays turned into tensors; non-tensor entries dropped; a bare image tower put
    under ``visual.`` and towers the backbones cannot take refused (:func:`normalize_image_tower`)."""
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"checkpoint holds a {type(data).__name__}, not a dict of weights")
    for key in ("model", "state_dict"):
        if key in data and isinstance(data[key], dict):
            data = data[key]
            break
    out = {}
    for k, v in data.items():
        if k.startswith("module."):
            k = k[len("module."):]
        if not torch.is_tensor(v):
            try:
                import numpy as np

                if isinstance(v, np.ndarray):
                    v = torch.from_numpy(v)
                else:
                    continue
            except ImportError:
                continue
        out[k] = v
    return normalize_image_tower(out, source)


_BARE_VIT_KEYS = ("conv1.weight", "class_embedding", "positional_embedding", "proj")
_BARE_RESNET_KEYS = ("layer1.0.conv1.weight", "attnpool.c_proj.weight")


def _bare_tower(sd: Dict[str, torch.Tensor]) -> bool:
    """Whether ``sd`` is a CLIP image tower on its own (a ViT's or a ResNet's keys, no prefix)."""
    if any(k.startswith(("visual.", "backbone.")) for k in sd) or "token_embedding.weight" in sd:
        return False
    return all(k in sd for k in _BARE_VIT_KEYS) or all(k in sd for k in _BARE_RESNET_KEYS)


def _foreign_tower(sd: Dict[str, torch.Tensor]):
    """``(description, example key)`` of an image tower the CLIP backbones cannot take, or None:
    open_clip's timm towers (``[visual.]trunk.*``) and EVA-CLIP's own ViT (``[visual.]patch_embed.*``
    with ``[visual.]blocks.*``)."""
    for prefix in ("visual.", ""):
        rel = {k[len(prefix):]: k for k in sd if k.startswith(prefix)}
        trunk = next((k for r, k in rel.items() if r.startswith("trunk.")), None)
        if trunk is not None:
            return (f"an open_clip timm image tower ({prefix}trunk.*: open_clip's EVA02-* models and other timm "
                    "towers)", trunk)
        if "patch_embed.proj.weight" in rel and any(r.startswith("blocks.") for r in rel):
            return (f"an EVA-CLIP image tower ({prefix}patch_embed.*, {prefix}blocks.*: EVA02-CLIP, the layout the "
                    "official CLIPSelf and F-ViT code writes for its EVA02 models)", rel["patch_embed.proj.weight"])
    return None


def normalize_image_tower(sd: Dict[str, torch.Tensor], source: str = "the checkpoint") -> Dict[str, torch.Tensor]:
    """``sd`` with a bare CLIP image tower (see the module docstring) put under ``visual.``, like a
    whole OpenAI / OpenCLIP file; any other state dict unchanged. Raises
    :class:`CheckpointFormatError` for EVA-CLIP and timm towers, which no backbone here implements."""
    foreign = _foreign_tower(sd)
    if foreign is not None:
        what, key = foreign
        raise CheckpointFormatError(
            f"{source} holds {what}, e.g. key {key!r}. The CLIP ViT backbone takes open_clip VisionTransformer "
            "weights only (OpenAI / OpenCLIP ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336 and CLIPSelf checkpoints "
            "of them: visual.conv1.weight, visual.class_embedding, visual.transformer.resblocks.*); EVA02 towers "
            "(rotary position embeddings, SwiGLU MLPs, separate q/k/v projections) are not implemented, so these "
            "weights cannot be loaded. Start from an OpenAI / OpenCLIP ViT instead "
            "(configs/clipself/CLIPSelf_ViT-B-16.yaml trains CLIPSelf on one)")
    if _bare_tower(sd):
        return {"visual." + k: v for k, v in sd.items()}
    return sd


def detect_format(sd: Dict[str, torch.Tensor]) -> str:
    """``clip`` (OpenAI / OpenCLIP keys), ``regionclip`` (detector keys incl. a CLIP
    ResNet backbone), ``detectron2`` (other detectron2 model) or ``unknown``."""
    keys = list(sd)
    if any(k.startswith("visual.") for k in keys) or "token_embedding.weight" in sd:
        return "clip"
    if any(k.startswith(("backbone.attnpool.", "backbone.bottom_up.attnpool.", "lang_encoder.",
                         "teacher_backbone.", "offline_backbone.")) for k in keys):
        return "regionclip"
    if any(k.startswith(("backbone.", "proposal_generator.", "roi_heads.")) for k in keys):
        return "detectron2"
    return "unknown"


def clip_to_detector_keys(sd: Dict[str, torch.Tensor], visual_prefixes=("backbone.",),
                          text_prefix: str = "lang_encoder.") -> Dict[str, torch.Tensor]:
    """Map an OpenAI / OpenCLIP state dict onto detector keys: ``visual.X`` ->
    ``<p>X`` for each visual prefix, text tower keys -> ``lang_encoder.X``; ``logit_scale``
    and ``attn_mask`` are dropped."""
    out = {}
    for k, v in sd.items():
        if k.startswith("visual."):
            for p in visual_prefixes:
                out[p + k[len("visual."):]] = v
        elif k.startswith(TEXT_PREFIXES) and text_prefix is not None:
            out[text_prefix + k] = v
    return out


def rpn_to_offline_keys(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A detectron2 RPN checkpoint (``backbone.*``, ``proposal_generator.*``) onto the
    detector's localization branch (``offline_backbone.*``, ``offline_proposal_generator.*``).
    Keys already in offline form are kept; anything else (e.g. ``roi_heads``) is dropped."""
    out = {}
    for k, v in sd.items():
        if k.startswith(("offline_backbone.", "offline_proposal_generator.")):
            out[k] = v
        elif k.startswith("backbone."):
            out["offline_" + k] = v
        elif k.startswith("proposal_generator."):
            out["offline_" + k] = v
    return out


def load_state_dict_file(path: str, trusted: bool = False) -> Tuple[Dict[str, torch.Tensor], str]:
    """Read any supported weight file: (state dict, detected format)."""
    sd = unwrap_state_dict(read_checkpoint(path, trusted=trusted), source=repr(path))
    fmt = detect_format(sd)
    if fmt == "unknown":
        sample = ", ".join(list(sd)[:5])
        raise CheckpointFormatError(
            f"unknown checkpoint format in {path!r} (first keys: {sample}): expected an OpenAI/OpenCLIP "
            "CLIP file (visual.*, token_embedding.*) or its image tower alone (conv1.weight, class_embedding, "
            "transformer.resblocks.*, ...), an official RegionCLIP or regionclip_d2 checkpoint "
            "(backbone.*, lang_encoder.*, ...) or a detectron2 RPN checkpoint")
    return sd, fmt
