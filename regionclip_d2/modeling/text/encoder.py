"""CLIP's language encoder (frozen everywhere in RegionCLIP).

``LanguageEncoder`` adopts the parts of open_clip's text tower under the names the
OpenAI / OpenCLIP state dicts and the official RegionCLIP ``lang_encoder.*`` keys use:
``token_embedding``, ``positional_embedding``, ``transformer``, ``ln_final``,
``text_projection``.
"""
import logging
from typing import List, Sequence

import torch
import torch.nn.functional as F
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

    def can_share_prefix(self) -> bool:
        """Whether :meth:`encode_after_prefix` applies: causal attention (a prefix's states do
        not depend on what follows it) in standard open_clip blocks."""
        if self.attn_mask is None or not torch.isinf(self.attn_mask[0, 1:]).all():
            return False
        blocks = list(self.transformer.resblocks)
        return all(hasattr(b, "ln_1") and isinstance(getattr(b, "attn", None), nn.MultiheadAttention)
                   and b.attn._qkv_same_embed_dim and not hasattr(b, "ln_1_kv") for b in blocks)

    @torch.no_grad()
    def encode_after_prefix(self, prefix: torch.Tensor, suffixes: torch.Tensor) -> torch.Tensor:
        """End-of-text embeddings ``[N, D]`` of texts that all start with the token ids
        ``prefix`` ``[P]`` (start-of-text included) and go on with ``suffixes`` ``[N, S]``
        (end-of-text included, zero padding after it): equal to ``self(cat(prefix, suffix))``
        up to float rounding. Under causal attention the prefix's states are the same in every
        text, so they are computed once and each text's own tokens attend to their keys and
        values (for prompt templates that is about 5 of 9 tokens per prompt not computed again).
        Needs :meth:`can_share_prefix`."""
        if not self.can_share_prefix():
            raise ValueError("this text tower has no causal mask (or non-standard blocks): encode the full texts")
        cast = self.transformer.get_cast_dtype() if hasattr(self.transformer, "get_cast_dtype") \
            else self.token_embedding.weight.dtype
        p, n = prefix.shape[0], suffixes.shape[0]
        s = int(suffixes.argmax(dim=-1).max()) + 1  # nothing after the last end-of-text token is needed
        suffixes = suffixes[:, :s]
        pos = self.positional_embedding.to(cast)
        h_pre = (self.token_embedding(prefix[None]).to(cast) + pos[:p])[0]  # [P, C]
        h = self.token_embedding(suffixes).to(cast) + pos[p:p + s]  # [N, S, C]
        # a suffix token sees the whole prefix and the suffix tokens up to itself
        mask = torch.cat([torch.zeros(s, p, dtype=h.dtype, device=h.device),
                          self.attn_mask[p:p + s, p:p + s].to(h.dtype)], dim=1)
        pre_mask = self.attn_mask[:p, :p].to(h.dtype)
        for block in self.transformer.resblocks:
            attn = block.attn
            heads, c = attn.num_heads, h.shape[-1]
            d = c // heads
            # the prefix: the block's ordinary causal forward; its keys and values for the suffix
            q_pre, k_pre, v_pre = F.linear(block.ln_1(h_pre), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            q, k, v = F.linear(block.ln_1(h), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            k = torch.cat([k_pre.expand(n, p, c), k], dim=1).view(n, p + s, heads, d).transpose(1, 2)
            v = torch.cat([v_pre.expand(n, p, c), v], dim=1).view(n, p + s, heads, d).transpose(1, 2)
            q = q.view(n, s, heads, d).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(n, s, c)
            h = h + block.ls_1(attn.out_proj(out))
            h = h + block.ls_2(block.mlp(block.ln_2(h)))
            qp = q_pre.view(p, heads, d).transpose(0, 1)
            out_pre = F.scaled_dot_product_attention(qp, k_pre.view(p, heads, d).transpose(0, 1),
                                                     v_pre.view(p, heads, d).transpose(0, 1), attn_mask=pre_mask)
            h_pre = h_pre + block.ls_1(attn.out_proj(out_pre.transpose(0, 1).reshape(p, c)))
            h_pre = h_pre + block.ls_2(block.mlp(block.ln_2(h_pre)))
        h = self.ln_final(h)
        return h[torch.arange(n, device=h.device), suffixes.argmax(dim=-1)] @ self.text_projection

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
