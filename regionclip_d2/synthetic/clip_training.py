"""Train a small CLIP from scratch on a synthetic world's image-caption pairs.

The model is open_clip's ``CLIP`` built in-process from a model-config dict
(``world_clip_config``): a ModifiedResNet image tower (``layers=(1, 1, 1, 1)``, width 16,
``image_size`` = the world's) and a 3-layer text transformer (width 128, 4 heads,
context 24) with open_clip's ``SimpleTokenizer`` (CLIP BPE, vocabulary 49408), joint
embedding 128, QuickGELU. Training uses the image-level symmetric contrastive loss of
CLIP with AdamW and a warm-up + cosine learning-rate schedule.

Images are preprocessed exactly as the detector's recognition branch does: RGB, divided
by 255, normalised with CLIP's mean / std.

The result is an ordinary open_clip checkpoint (``torch.save(model.state_dict())``) plus
its model-config JSON, so the project loads it with
``regionclip_d2.modeling.clip_model.build_full_clip("", config_json)`` or
``regionclip_d2.checkpoint.load_clip_weights(path, backbone=..., lang_encoder=...)``.

This module holds the model config, the training loop and saving / loading; the data
(``clip_data``) and the evaluation (``clip_eval``) live in their own modules, whose public
names are re-exported here.
"""
import json
import logging
import math
import os
import time
from typing import Optional, Tuple

import numpy as np
import torch

from ..modeling.clip_model import build_clip_from_config
from ..modeling.losses import image_text_contrastive_loss
from ..modeling.text.encoder import tokenizer_for_config
from .clip_data import load_images, load_split_pairs, preprocess, single_object_images
from .clip_eval import (
    ZERO_SHOT_TEMPLATE,
    _autocast,
    encode_images,
    encode_texts,
    retrieval_top1,
    zero_shot_shape_accuracy,
)
from .world import load_world

__all__ = [
    # re-exported from clip_data and clip_eval
    "load_images", "load_split_pairs", "single_object_images", "preprocess", "ZERO_SHOT_TEMPLATE",
    "encode_images", "encode_texts", "retrieval_top1", "zero_shot_shape_accuracy",
    # defined here
    "CHECKPOINT_NAME", "CONFIG_NAME", "METRICS_NAME", "world_clip_config", "cpu_has_fast_bf16", "random_zoom",
    "save_world_clip", "load_world_clip", "train_world_clip",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "world_clip.pt"
CONFIG_NAME = "world_clip.json"
METRICS_NAME = "world_clip_metrics.json"


def world_clip_config(image_size: int = 128, context_length: int = 24, embed_dim: int = 128,
                      vision_width: Optional[int] = None, vision_layers=None,
                      text_width: int = 128, text_layers: int = 3, text_heads: int = 4,
                      quick_gelu: bool = True, patch_size: Optional[int] = None, head_width: int = 32) -> dict:
    """An open_clip model config (the format of open_clip's ``model_configs/*.json``):
    ``embed_dim``, ``quick_gelu``, ``vision_cfg``, ``text_cfg``.

    The image tower is a ModifiedResNet (``vision_layers``: blocks per stage, default
    ``(1, 1, 1, 1)``; ``vision_width`` default 16) unless ``patch_size`` is given: then a
    VisionTransformer of ``patch_size`` px patches, ``vision_layers`` blocks (an int, or a
    one-element sequence; default 4) of width ``vision_width`` (default 64) and
    ``vision_width / head_width`` heads (the tower CLIPSelf trains)."""
    vit = patch_size is not None
    vision_width = vision_width or (64 if vit else 16)
    vision_layers = vision_layers if vision_layers is not None else (4 if vit else (1, 1, 1, 1))
    vision = {"image_size": int(image_size), "width": int(vision_width)}
    if not vit:
        if image_size % 32:
            raise ValueError(f"image_size={image_size} must be a multiple of 32 (the attention pool of the "
                             "ResNet image tower works on image_size/32 cells)")
        vision.update(layers=[int(v) for v in vision_layers], patch_size=None)
    else:
        layers = vision_layers if isinstance(vision_layers, int) else list(vision_layers)
        if not isinstance(layers, int):
            if len(layers) != 1:
                raise ValueError(f"vision_layers={vision_layers}: a ViT image tower takes one number of blocks")
            layers = layers[0]
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide image_size={image_size} (the ViT's patch grid)")
        if head_width < 1 or vision_width % head_width:
            raise ValueError(f"vision_width={vision_width} must be a multiple of head_width={head_width} "
                             "(the ViT's attention heads)")
        vision.update(layers=int(layers), patch_size=int(patch_size), head_width=int(head_width))
    return {
        "embed_dim": int(embed_dim),
        "quick_gelu": bool(quick_gelu),
        "vision_cfg": vision,
        "text_cfg": {"context_length": int(context_length), "vocab_size": 49408, "width": int(text_width),
                     "heads": int(text_heads), "layers": int(text_layers)},
    }


def cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX-512 BF16 or AMX). Elsewhere bf16
    autocast is emulated and slow (measured on an AVX2-only EPYC, 2 threads: a world-CLIP step
    takes 14 s in bf16 against 1.05 s in fp32), so training stays in fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _attention_backend(math_attention: bool):
    """Scaled-dot-product attention on the plain "math" kernel: for these short sequences
    (24 tokens, 17 attention-pool cells) the CPU flash kernel's backward is about 2x slower
    than the math path under bf16 (measured: text tower fwd+bwd 0.30 s -> 0.15 s, batch 128)."""
    import contextlib

    if not math_attention:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def random_zoom(images: torch.Tensor, prob: float, min_scale: float, generator: torch.Generator) -> torch.Tensor:
    """Zoom augmentation: each image, with probability ``prob``, is replaced by a random
    square crop of side ``U(min_scale, 1) x`` its side, resized back (bilinear).

    Args:
        images: ``[N, 3, S, S]`` float images.
    Returns:
        ``[N, 3, S, S]``.
    """
    from torchvision.ops import roi_align

    if prob <= 0:
        return images
    n, _, h, w = images.shape
    zoom = torch.rand(n, generator=generator) < prob
    side = torch.where(zoom, min_scale + (1 - min_scale) * torch.rand(n, generator=generator), torch.ones(n))
    x0 = torch.rand(n, generator=generator) * (1 - side) * w
    y0 = torch.rand(n, generator=generator) * (1 - side) * h
    boxes = torch.stack([torch.arange(n, dtype=torch.float32), x0, y0, x0 + side * w, y0 + side * h], dim=1)
    out = roi_align(images.contiguous(), boxes, (h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return torch.where(zoom[:, None, None, None], out, images)


def _cosine_lambda(steps: int, warmup: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless stream of index batches, each without repeats (epoch permutations)."""
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while buf.numel() < batch_size:
            buf = torch.cat([buf, torch.randperm(n, generator=generator)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


def save_world_clip(model, model_cfg: dict, out_dir: str) -> Tuple[str, str]:
    """Write ``world_clip.pt`` (plain state dict, contiguous tensors) and ``world_clip.json``
    (open_clip model config) into ``out_dir``; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(out_dir, CHECKPOINT_NAME)
    cfg_path = os.path.join(out_dir, CONFIG_NAME)
    sd = {k: v.detach().float().contiguous() if v.is_floating_point() else v.detach().contiguous()
          for k, v in model.state_dict().items()}
    torch.save(sd, ckpt)
    with open(cfg_path, "w") as f:
        json.dump(model_cfg, f, indent=1)
    return ckpt, cfg_path


def load_world_clip(out_dir: str):
    """The trained model (eval mode) and its config from a ``train_world_clip`` output folder."""
    from ..modeling.clip_model import build_full_clip

    cfg_path = os.path.join(out_dir, CONFIG_NAME)
    ckpt = os.path.join(out_dir, CHECKPOINT_NAME)
    for p in (cfg_path, ckpt):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} does not exist: train the world CLIP first (tools/train_world_clip.py "
                                    f"--output-dir {out_dir})")
    model = build_full_clip("", cfg_path)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    with open(cfg_path) as f:
        return model.eval(), json.load(f)


def train_world_clip(world_dir: str, out_dir: str, steps: int = 1000, batch_size: int = 128, lr: float = 2e-3,
                     weight_decay: float = 0.1, warmup: Optional[int] = None, seed: int = 0,
                     bf16: Optional[bool] = None,
                     channels_last: bool = True, context_length: int = 24, model_cfg: Optional[dict] = None,
                     max_train_images: Optional[int] = None, eval_split: Optional[str] = "val",
                     max_eval_images: Optional[int] = 1000, log_every: int = 50, progress: bool = True,
                     save: bool = True, math_attention: bool = True, zoom_prob: float = 0.0,
                     zoom_min_scale: float = 0.6, init_logit_scale: Optional[float] = None) -> dict:
    """Train a world CLIP with the symmetric image-text contrastive loss and save it.

    Args:
        world_dir: a folder written by ``generate_world`` (``world.json``, images, captions).
        out_dir: where ``world_clip.pt``, ``world_clip.json`` and ``world_clip_metrics.json`` go.
        steps: optimiser steps; batch_size: image-caption pairs per step (each image gets one
            of its captions at random; batches hold distinct images).
        lr, weight_decay, warmup: AdamW; linear warm-up over ``warmup`` steps (default 5% of
            ``steps``) then cosine decay to 0.
        bf16: bfloat16 autocast on CPU (~1.9x faster where the CPU has native bf16; None = use it
            only there, see ``cpu_has_fast_bf16``); channels_last: NHWC image tower;
            math_attention: attention on torch's math kernel (faster backward on CPU).
        model_cfg: open_clip model config (default ``world_clip_config(world image size,
            context_length)``).
        zoom_prob, zoom_min_scale: the zoom augmentation (:func:`random_zoom`): a share of the
            images is replaced by a random crop of at least ``zoom_min_scale`` of the side, so the
            CLIP also sees objects larger in the frame, as a detector's tight regions show them.
        init_logit_scale: starting value of the learned logit scale (1 / temperature; open_clip
            starts at 1/0.07 = 14.3, clamped to 100); None keeps open_clip's.
        eval_split: split for held-out retrieval / zero-shot metrics (None: skip).
        max_eval_images: evaluate on at most this many images of ``eval_split``.

    Returns:
        metrics: losses (first / last / history), timings (``seconds``, ``sec_per_step``),
        ``retrieval_top1`` and ``zero_shot`` on ``eval_split``, file paths, world fingerprint, and
        ``model``: the trained CLIP in eval mode (not written to the metrics JSON).
    """
    world = load_world(world_dir)
    if bf16 is None:
        bf16 = cpu_has_fast_bf16()
    if steps < 1 or batch_size < 2:
        raise ValueError(f"steps={steps}, batch_size={batch_size}: need steps >= 1 and batch_size >= 2 "
                         "(the contrastive loss needs negatives)")
    model_cfg = model_cfg or world_clip_config(world["image_size"], context_length)
    if model_cfg["vision_cfg"]["image_size"] != world["image_size"]:
        raise ValueError(f"model image_size {model_cfg['vision_cfg']['image_size']} != the world's "
                         f"{world['image_size']}: build the model config for the world's image size")
    torch.manual_seed(seed)
    images, captions, _ = load_split_pairs(world_dir, "train", max_train_images, progress=progress)
    n = images.shape[0]
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} training images: lower --batch-size")
    tokenizer = tokenizer_for_config(model_cfg)
    flat = [c for cs in captions for c in cs]
    tokens = tokenizer(flat)
    counts = torch.tensor([len(cs) for cs in captions])
    offsets = torch.cumsum(counts, 0) - counts

    model = build_clip_from_config(model_cfg)
    if init_logit_scale is not None:
        if not 1.0 <= init_logit_scale <= 100.0:
            raise ValueError(f"init_logit_scale={init_logit_scale}: use a value in 1..100 (1 / temperature)")
        with torch.no_grad():
            model.logit_scale.fill_(math.log(init_logit_scale))
    if channels_last:
        model.visual.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, int(0.05 * steps)) if warmup is None else max(1, warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine_lambda(steps, warmup))
    gen = torch.Generator().manual_seed(seed)
    batches = _batches(n, batch_size, gen)
    history, losses = [], []
    it = range(steps)
    bar = None
    if progress:
        from tqdm import tqdm

        it = bar = tqdm(it, desc="world CLIP", unit="step")
    t0 = time.time()
    for step in it:
        idx = next(batches)
        pick = offsets[idx] + (torch.rand(len(idx), generator=gen) * counts[idx]).long()
        x = preprocess(images[idx])
        x = random_zoom(x, zoom_prob, zoom_min_scale, gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(bf16), _attention_backend(math_attention):
            img_f = model.encode_image(x, normalize=True)
            txt_f = model.encode_text(tokens[pick], normalize=True)
        loss = image_text_contrastive_loss(img_f, txt_f, tau=1.0 / model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        v = loss.detach().item()
        if not math.isfinite(v):
            raise FloatingPointError(f"world CLIP loss became {v} at step {step}: lower the learning rate "
                                     f"(lr={lr}) or disable bf16")
        losses.append(v)
        if (step + 1) % log_every == 0 or step == 0 or step == steps - 1:
            recent = float(np.mean(losses[-log_every:]))
            history.append({"step": step + 1, "loss": recent, "lr": sched.get_last_lr()[0]})
            logger.info("world CLIP step %d/%d loss %.4f", step + 1, steps, recent)
            if bar is not None:
                bar.set_postfix(loss=f"{recent:.3f}")
    seconds = time.time() - t0
    k = max(1, min(10, steps // 5))
    metrics = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "bf16": bf16,
        "channels_last": channels_last, "math_attention": math_attention,
        "zoom_prob": zoom_prob, "zoom_min_scale": zoom_min_scale, "train_images": n,
        "init_logit_scale": init_logit_scale,
        "seconds": seconds, "sec_per_step": seconds / steps,
        "loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
        "loss_history": history, "logit_scale": model.logit_scale.exp().item(),
        "world_fingerprint": world["fingerprint"], "model_config": model_cfg,
    }
    model.eval()
    if eval_split and not world["counts"].get(eval_split, {}).get("images"):
        logger.warning("world has no %s images: skipping the held-out evaluation", eval_split)
        eval_split = None
    if eval_split:
        ev_images, ev_caps, _ = load_split_pairs(world_dir, eval_split, max_eval_images)
        first = [cs[0] for cs in ev_caps]
        metrics["retrieval_top1"] = retrieval_top1(model, ev_images, first, tokenizer, bf16=bf16)
        metrics["retrieval_chance"] = 1.0 / len(first)
        metrics["retrieval_top1_chunk32"] = retrieval_top1(model, ev_images, first, tokenizer, chunk=32,
                                                           bf16=bf16)
        try:
            so_images, so_labels = single_object_images(world_dir, eval_split, max_eval_images)
        except ValueError:
            so_images = None
        if so_images is not None:
            names = [c["name"] for c in world["categories"]]
            metrics["zero_shot"] = zero_shot_shape_accuracy(model, so_images, so_labels, names, world["novel"],
                                                            tokenizer, bf16=bf16)
        metrics["eval_split"] = eval_split
    if save:
        ckpt, cfg_path = save_world_clip(model, model_cfg, out_dir)
        metrics["checkpoint"], metrics["model_config_file"] = ckpt, cfg_path
        with open(os.path.join(out_dir, METRICS_NAME), "w") as f:
            json.dump(metrics, f, indent=1)
    metrics["model"] = model
    return metrics

