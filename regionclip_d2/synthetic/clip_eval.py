"""Evaluation of a world CLIP: image / text encoding (L2-normalised, optional bf16
autocast), image-to-caption retrieval top-1 and whole-image zero-shot shape accuracy."""
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..modeling.text.encoder import tokenizer_for_config
from .clip_data import preprocess

ZERO_SHOT_TEMPLATE = "a photo of a {}."


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch_size: int = 256, bf16: bool = False) -> torch.Tensor:
    """uint8 ``[N, 3, S, S]`` -> L2-normalised float32 ``[N, D]`` (model in eval mode)."""
    was = model.training
    model.eval()
    cl = next(model.visual.parameters()).is_contiguous(memory_format=torch.channels_last) \
        and next(model.visual.parameters()).dim() == 4
    outs = []
    with _autocast(bf16):
        for i in range(0, images.shape[0], batch_size):
            outs.append(model.encode_image(preprocess(images[i:i + batch_size], cl), normalize=True).float())
    model.train(was)
    return F.normalize(torch.cat(outs), dim=-1)


@torch.no_grad()
def encode_texts(model, texts: Sequence[str], tokenizer=None, batch_size: int = 512,
                 bf16: bool = False) -> torch.Tensor:
    """Strings -> L2-normalised float32 ``[N, D]``."""
    tokenizer = tokenizer or _tokenizer_for(model)
    was = model.training
    model.eval()
    outs = []
    with _autocast(bf16):
        for i in range(0, len(texts), batch_size):
            outs.append(model.encode_text(tokenizer(list(texts[i:i + batch_size])), normalize=True).float())
    model.train(was)
    return F.normalize(torch.cat(outs), dim=-1)


def _tokenizer_for(model):
    return tokenizer_for_config({"text_cfg": {"context_length": model.context_length}})


def retrieval_top1(model, images: torch.Tensor, captions: Sequence[str], tokenizer=None,
                   chunk: Optional[int] = None, bf16: bool = False) -> float:
    """Image -> caption retrieval top-1 accuracy (fraction in 0..1).

    Image ``i``'s correct caption is ``captions[i]``; candidates are the captions of the
    same chunk of ``chunk`` consecutive images (all ``N`` if None; chance = 1 / chunk).
    A retrieved caption with the same text as the correct one counts as correct (template
    captions repeat, e.g. "a moon").
    """
    if images.shape[0] != len(captions):
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions: give one caption per image")
    img = encode_images(model, images, bf16=bf16)
    txt = encode_texts(model, captions, tokenizer, bf16=bf16)
    n = len(captions)
    chunk = chunk or n
    correct = 0
    for s in range(0, n, chunk):
        sims = img[s:s + chunk] @ txt[s:s + chunk].t()
        best = sims.argmax(1).tolist()
        correct += sum(captions[s + b] == captions[s + i] for i, b in enumerate(best))
    return correct / n


def zero_shot_shape_accuracy(model, images: torch.Tensor, labels: Sequence[str], class_names: Sequence[str],
                             novel: Sequence[str] = (), tokenizer=None, template: str = ZERO_SHOT_TEMPLATE,
                             bf16: bool = False) -> dict:
    """Whole-image zero-shot classification of single-object images with prompts
    ``template.format(name)``.

    Returns ``{"accuracy", "accuracy_base", "accuracy_novel", "accuracy_novel_among_novel",
    "n", "n_novel", "chance", "per_class"}`` (accuracies in 0..1; ``accuracy_novel`` is over
    all classes on novel-object images, ``..._among_novel`` only among the novel classes).
    """
    unknown = sorted(set(labels) - set(class_names))
    if unknown:
        raise ValueError(f"labels {unknown} are not among class_names {list(class_names)}")
    img = encode_images(model, images, bf16=bf16)
    txt = encode_texts(model, [template.format(c) for c in class_names], tokenizer, bf16=bf16)
    sims = img @ txt.t()
    pred = sims.argmax(1).tolist()
    idx = {c: i for i, c in enumerate(class_names)}
    truth = [idx[c] for c in labels]
    ok = np.array([p == t for p, t in zip(pred, truth)])
    is_novel = np.array([c in set(novel) for c in labels])
    novel_idx = [idx[c] for c in class_names if c in set(novel)]
    if novel_idx and is_novel.any():
        sub = sims[torch.from_numpy(is_novel)][:, novel_idx].argmax(1).tolist()
        among = float(np.mean([novel_idx[p] == t for p, t in zip(sub, np.array(truth)[is_novel])]))
    else:
        among = float("nan")

    def mean(mask):
        return float(ok[mask].mean()) if mask.any() else float("nan")

    per_class = {c: mean(np.array([lab == c for lab in labels])) for c in class_names}
    return {"accuracy": float(ok.mean()), "accuracy_base": mean(~is_novel), "accuracy_novel": mean(is_novel),
            "accuracy_novel_among_novel": among, "n": int(len(labels)), "n_novel": int(is_novel.sum()),
            "chance": 1.0 / len(class_names), "per_class": per_class}
