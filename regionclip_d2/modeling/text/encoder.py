"""CLIP's language encoder (frozen everywhere in RegionCLIP).

``LanguageEncoder`` adopts the parts of open_clip's text tower under the names the
OpenAI / OpenCLIP state dicts and the official RegionCLIP ``lang_encoder.*`` keys use:
``token_embedding``, ``positional_embedding``, ``transformer``, ``ln_final``,
``text_projection``.
"""
import logging
from typing import List, Sequence

import torch
from torch import nn

from ..clip_model import build_text_tower, get_clip_model_config

logger = logging.getLogger(__name__)


class LanguageEncoder(nn.Module):
    """Text tower: token ids ``[N, L]`` -> end-of-text embeddings ``[N, D]``.

    Args:
        text: an open_clip ``TextTransformer`` whose pooling is ``argmax`` (the
            end-of-text token has the largest id in CLIP's BPE vocabulary).
        tokenizer: callable ``list[str] -> LongTensor [N, context_length]``.
    """

    def __init__(self, text: nn.Module, tokenizer):
        super().__init__()
        if getattr(text, "pool_type", "argmax") != "argmax" or getattr(text, "cls_emb", None) is not None:
            raise ValueError("only CLIP-style text towers (end-of-text pooling) are supported")
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.transformer = text.transformer
        self.ln_final = text.ln_final
        proj = text.text_projection
        if isinstance(proj, nn.Linear):
            raise ValueError("text towers with a Linear projection are not supported")
        self.text_projection = proj
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)
        self.context_length = text.context_length
        self.tokenizer = tokenizer

    @property
    def embed_dim(self) -> int:
        return self.text_projection.shape[1]

    @property
    def device(self):
        return self.token_embedding.weight.device

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[N, context_length]`` (texts longer than the context are truncated)."""
        return self.tokenizer(list(texts)).to(self.device)

    def forward(self, tokens: torch.Tensor, all_tokens: bool = False):
        """``[N, L]`` token ids -> ``[N, D]`` end-of-text embeddings (not normalised).
        With ``all_tokens`` also returns every token's projected feature ``[N, L, D]``."""
        cast = self.transformer.get_cast_dtype() if hasattr(self.transformer, "get_cast_dtype") \
            else self.token_embedding.weight.dtype
        if not all_tokens and self.attn_mask is not None:
            # causal attention: the end-of-text output depends only on the tokens up to it,
            # so the padding after the longest text of the batch need not be computed
            tokens = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]
        length = tokens.shape[1]
        x = self.token_embedding(tokens).to(cast)
        x = x + self.positional_embedding[:length].to(cast)
        mask = self.attn_mask[:length, :length] if self.attn_mask is not None else None
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        eot = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.text_projection
        if all_tokens:
            return eot, x @ self.text_projection
        return eot

    @torch.no_grad()
    def encode(self, texts: List[str], batch_size: int = 256) -> torch.Tensor:
        """Embed raw strings: ``[N, D]`` (not normalised)."""
        outs = [self(self.tokenize(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)]
        if not outs:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return torch.cat(outs).float()


def build_tokenizer(model_name: str, config_file: str = ""):
    """open_clip's tokenizer for the model (CLIP BPE, shipped with open_clip: no download)."""
    return tokenizer_for_config(get_clip_model_config(model_name, config_file), model_name or config_file)


def tokenizer_for_config(cfg: dict, what: str = "the model"):
    """open_clip's CLIP BPE tokenizer for a model-config dict's text context length."""
    import open_clip

    text_cfg = cfg["text_cfg"]
    if text_cfg.get("hf_tokenizer_name"):
        raise ValueError(f"{what}: Hugging Face tokenizers need a hub download; use a CLIP BPE text tower")
    return open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))


def build_language_encoder(model_name: str, config_file: str = "") -> LanguageEncoder:
    """A randomly initialised ``LanguageEncoder`` for an open_clip architecture; load
    weights with :func:`regionclip_d2.checkpoint.load_clip_weights`."""
    text, _ = build_text_tower(model_name, config_file)
    enc = LanguageEncoder(text, build_tokenizer(model_name, config_file))
    for p in enc.parameters():
        p.requires_grad = False
    return enc.eval()
