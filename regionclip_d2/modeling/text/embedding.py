"""The one function that embeds class names (used by the detector, the demo, the
evaluators and the tools alike), with an on-disk cache.

A class embedding is the mean over prompt templates of the L2-normalised text
embeddings of ``template.format(name)``, normalised again: ``[C, D]``, unit rows.
"""
import hashlib
import logging
import os
import threading
from typing import List, Optional, Sequence

import torch
from tqdm import tqdm

from ...checkpoint.loading import process_alive
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
    checkpoint_every: int = 50000,
) -> torch.Tensor:
    """Embed class names with a :class:`LanguageEncoder`.

    Args:
        names: class names (validated: non-empty, distinct).
        encoder: the language encoder (its weights are part of the cache key).
        templates: ``imagenet80`` | ``single`` | ``none`` | a template string.
        cache_dir: cache root (default ``$REGIONCLIP_CACHE`` or ``~/.cache/regionclip_d2``).
        progress: show a progress bar (default: when there are more than 2000 prompts).
        checkpoint_every: with the cache, save progress every this many prompts to
            ``<entry>.partial``, so that an interrupted embedding of a large vocabulary resumes.
    A cache that cannot be written (read-only or full disk) is warned about and skipped.
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
    if path is not None:
        _remove_orphaned_temporaries(os.path.dirname(path))
    # per-class sums of the normalised prompt features, filled batch by batch (memory: [C, D],
    # not [C * templates, D]); progress saved every ``checkpoint_every`` prompts when caching
    # prompts of similar token length are embedded together: the encoder computes each batch only
    # up to its longest prompt's end-of-text token (1.5x fewer operations on LVIS names x 80
    # templates than in name order); the order is deterministic, so progress files resume
    order = _length_order(names, tmpl, encoder)
    prefixes = _template_prefixes(tmpl, encoder)
    sums, start = _resume(path, len(prompts)) if path is not None else (None, 0)
    every = max(batch_size, checkpoint_every)
    bar = tqdm(total=len(prompts), initial=start, desc="embedding prompts", unit="prompt", disable=not progress)
    for i in range(start, len(prompts), batch_size):
        idx = order[i:i + batch_size]
        f = torch.nn.functional.normalize(_encode_prompts(encoder, idx, prompts, prefixes).float(), dim=-1)
        if sums is None:
            sums = torch.zeros(len(names), f.shape[1])
        sums.index_add_(0, idx // len(tmpl), f.cpu())
        bar.update(f.shape[0])
        done = i + f.shape[0]
        if path is not None and done < len(prompts) and done // every > i // every:
            _try_save({"done": done, "sums": sums, "order": PROMPT_ORDER}, path + ".partial")
    bar.close()
    emb = torch.nn.functional.normalize(sums / len(tmpl), dim=-1)
    if path is not None:
        _try_save(emb, path)
        if os.path.exists(path + ".partial"):
            try:
                os.remove(path + ".partial")
            except OSError:
                pass
    return emb


PROMPT_ORDER = "template, token-length"  # recorded in progress files: one in another order is not resumed


def _length_order(names, templates, encoder) -> torch.Tensor:
    """Prompt indices (``name * len(templates) + template``) by template, then by the name's token
    count (ties in index order): a batch holds few templates, whose shared beginning is computed
    once (:func:`_encode_prompts`), and names of similar length, so each batch stops at a nearby
    end-of-text token."""
    encode = getattr(encoder.tokenizer, "encode", None)
    name_len = [len(encode(prompt_name(n))) if encode is not None else len(prompt_name(n)) for n in names]
    t = len(templates)
    key = torch.tensor([j * (max(name_len) + 1) + name_len[i] for i in range(len(names)) for j in range(t)])
    return torch.sort(key, stable=True).indices


def _template_prefixes(templates, encoder) -> List[Optional[torch.Tensor]]:
    """Per template, the token ids of its text before ``{}`` (start-of-text included), which every
    prompt of that template begins with; None where the encoder cannot share a prefix."""
    if not getattr(encoder, "can_share_prefix", lambda: False)():
        return [None] * len(templates)
    out = []
    for t in templates:
        ids = encoder.tokenize([t.split("{}")[0]])[0]
        end = int(ids.argmax())  # the end-of-text token closes the prefix's own tokenization
        out.append(ids[:end] if end > 0 else None)
    return out


def _encode_prompts(encoder, idx: torch.Tensor, prompts: List[str], prefixes) -> torch.Tensor:
    """Embeddings ``[len(idx), D]`` of ``prompts[idx]`` (prompt ``k`` uses template ``k % T``):
    for each template in the batch, the prompts that begin with its prefix's tokens are encoded
    after the prefix (:meth:`LanguageEncoder.encode_after_prefix`, the same embeddings up to
    float rounding); any other prompt (e.g. where the name joins the template's last word into
    one token) is encoded whole."""
    tokens = encoder.tokenize([prompts[j] for j in idx.tolist()])
    if all(p is None for p in prefixes):
        return encoder(tokens)
    out = [None] * len(idx)
    whole = []
    templ = (idx % len(prefixes)).tolist()
    for t in sorted(set(templ)):
        rows = torch.tensor([r for r, x in enumerate(templ) if x == t], dtype=torch.long)
        pre = prefixes[t]
        if pre is None:
            whole += rows.tolist()
            continue
        p = pre.shape[0]
        # the prefix holds no end-of-text token, so a prompt that begins with it has its own after it
        ok = (tokens[rows, :p] == pre.to(tokens.device)).all(dim=1) if p < tokens.shape[1] \
            else torch.zeros(len(rows), dtype=torch.bool)
        whole += rows[~ok].tolist()
        shared = rows[ok]
        if len(shared):
            for r, e in zip(shared.tolist(), encoder.encode_after_prefix(pre, tokens[shared, p:])):
                out[r] = e
    if whole:
        for r, e in zip(whole, encoder(tokens[whole])):
            out[r] = e
    return torch.stack(out)


def _resume(path: str, n_prompts: int):
    """(sums, prompts done) from an interrupted run's ``<entry>.partial``, or (None, 0)."""
    partial = path + ".partial"
    if not os.path.isfile(partial):
        return None, 0
    try:
        state = torch.load(partial, map_location="cpu", weights_only=True)
        done = int(state["done"])
        if state.get("order") != PROMPT_ORDER:
            logger.info("ignoring %s: written by a version that embedded prompts in another order", partial)
            return None, 0
        if 0 < done < n_prompts and torch.is_tensor(state["sums"]):
            logger.info("resuming the text embedding at prompt %d of %d (%s)", done, n_prompts, partial)
            return state["sums"], done
    except Exception as e:  # a damaged progress file: start over
        logger.warning("ignoring unreadable progress file %s (%s)", partial, e)
    return None, 0


def _try_save(obj, path: str) -> bool:
    """Write ``obj`` to ``path`` atomically; on failure (read-only or full disk) warn and go on
    without the cache."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # per process and thread: no shared temp file
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(obj, tmp)
        os.replace(tmp, path)
        return True
    except OSError as e:
        logger.warning("cannot write the text-embedding cache %s (%s): continuing without it; set "
                       "$REGIONCLIP_CACHE to a writable folder to keep embeddings between runs", path, e)
        try:
            os.remove(tmp)
        except OSError:
            pass
        return False


def _remove_orphaned_temporaries(folder: str):
    """Delete ``*.<pid>.<thread>.tmp`` files of cache writes whose process is gone."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        parts = name.split(".")
        if len(parts) < 4 or parts[-1] != "tmp" or not parts[-3].isdigit():
            continue
        pid = int(parts[-3])
        if process_alive(pid):
            continue
        try:
            os.remove(os.path.join(folder, name))
            logger.info("removed %s, left by an interrupted cache write", name)
        except OSError:
            pass



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
