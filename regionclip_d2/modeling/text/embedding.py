"""The one function that embeds class names (used by the detector, the demo, the
evaluators and the tools alike), with an on-disk cache.

A class embedding is the mean over prompt templates of the L2-normalised text
embeddings of ``template.format(name)``, normalised again: ``[C, D]``, unit rows.
"""
import hashlib
import logging
import os
import threading
from typing import Sequence

import torch
from tqdm import tqdm

from ...data.vocabularies import check_vocabulary, prompt_name
from .templates import get_templates

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


def default_cache_dir() -> str:
    return os.environ.get("REGIONCLIP_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "regionclip_d2"))


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A cheap, content-based identifier of a module's weights: names, shapes and a
    strided sample of the values of every tensor in its state dict."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().float().reshape(-1).cpu()
        step = max(1, t.numel() // 512)
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t[::step].numpy().tobytes())
        h.update(t.sum().double().numpy().tobytes())
    return h.hexdigest()[:24]


def _cache_path(cache_dir, encoder, names, templates):
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}".encode())
    h.update(weights_fingerprint(encoder).encode())
    h.update("\x1f".join(templates).encode())
    h.update("\x1e".join(names).encode())
    return os.path.join(cache_dir, "text_embeddings", h.hexdigest()[:32] + ".pth")


@torch.no_grad()
def embed_class_names(
    names: Sequence[str],
    encoder,
    templates: str = "imagenet80",
    cache_dir: str = None,
    use_cache: bool = True,
    batch_size: int = 512,
    progress: bool = None,
) -> torch.Tensor:
    """Embed class names with a :class:`LanguageEncoder`.

    Args:
        names: class names (validated: non-empty, distinct).
        encoder: the language encoder (its weights are part of the cache key).
        templates: ``imagenet80`` | ``single`` | ``none`` | a template string.
        cache_dir: cache root (default ``$REGIONCLIP_CACHE`` or ``~/.cache/regionclip_d2``).
        progress: show a progress bar (default: when there are more than 2000 prompts).
    Returns:
        ``[C, D]`` float32 embeddings with unit L2 norm, on CPU.
    """
    names = check_vocabulary(names)
    tmpl = get_templates(templates)
    path = None
    if use_cache:
        path = _cache_path(cache_dir or default_cache_dir(), encoder, names, tmpl)
        if os.path.isfile(path):
            try:
                emb = torch.load(path, map_location="cpu", weights_only=True)
                if emb.shape[0] == len(names):
                    return emb
            except Exception as e:  # a damaged cache entry is recomputed
                logger.warning("ignoring unreadable text-embedding cache %s (%s)", path, e)
    prompts = [t.format(prompt_name(n)) for n in names for t in tmpl]
    too_long = [n for n in names if len(encoder.tokenizer.encode(prompt_name(n))) + 2 > encoder.context_length] \
        if hasattr(encoder.tokenizer, "encode") else []
    if too_long:
        logger.warning("%d class name(s) exceed the text context of %d tokens and are truncated, "
                       "e.g. %r", len(too_long), encoder.context_length, too_long[0][:80])
    if progress is None:
        progress = len(prompts) > 2000
    feats = []
    bar = tqdm(total=len(prompts), desc="embedding prompts", unit="prompt", disable=not progress)
    for i in range(0, len(prompts), batch_size):
        f = encoder(encoder.tokenize(prompts[i:i + batch_size])).float()
        feats.append(torch.nn.functional.normalize(f, dim=-1))
        bar.update(min(batch_size, len(prompts) - i))
    bar.close()
    emb = torch.cat(feats).reshape(len(names), len(tmpl), -1).mean(dim=1)
    emb = torch.nn.functional.normalize(emb, dim=-1).cpu()
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # per process and thread: no shared temp file
        torch.save(emb, tmp)
        os.replace(tmp, path)
    return emb


def load_text_embeddings(path: str, expected_dim: int = None, what: str = "MODEL.CLIP.TEXT_EMB_PATH",
                         trusted: bool = False) -> torch.Tensor:
    """Load a ``[C, D]`` embedding file (``.pth`` tensor or ``.npy``) and check its dimension."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text embedding file {path!r} ({what}) does not exist: create it with "
                                "tools/embed_vocabulary.py or set a vocabulary instead")
    if path.endswith(".npy"):
        import numpy as np

        emb = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        try:
            emb = torch.load(path, map_location="cpu", weights_only=not trusted)
        except Exception as e:
            raise ValueError(f"cannot read text embeddings {path!r} with weights_only=True ({e}); "
                             "if you trust the file set MODEL.CLIP.TRUST_CHECKPOINTS True") from e
        if isinstance(emb, dict):
            tensors = [v for v in emb.values() if torch.is_tensor(v) and v.dim() == 2]
            if len(tensors) != 1:
                raise ValueError(f"{path!r} holds a dict without exactly one [C, D] tensor")
            emb = tensors[0]
    if not torch.is_tensor(emb) or emb.dim() != 2:
        raise ValueError(f"text embeddings in {path!r} must be a [C, D] tensor, got "
                         f"{getattr(emb, 'shape', type(emb))}")
    if expected_dim is not None and emb.shape[1] != expected_dim:
        raise ValueError(
            f"text embeddings in {path!r} have dim {emb.shape[1]} but the backbone produces "
            f"{expected_dim}: set {what} to embeddings from the same CLIP model (or "
            "MODEL.CLIP.TEXT_EMB_DIM / MODEL.CLIP.OPENCLIP_MODEL to match them)")
    return emb.float()
