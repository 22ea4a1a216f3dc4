"""Per-token text features for grounding: every position of CLIP's text tower, through
``ln_final`` and ``text_projection`` (the joint image-text space), not only the end-of-text
token that ``encode_text`` keeps.

:class:`TokenFeatureEncoder` wraps the project's :class:`~regionclip_d2.modeling.text.LanguageEncoder`
(``build_language_encoder``, or a detector's ``lang_encoder``). Frozen by default (no gradient,
kept in eval mode); ``trainable=True`` lets the tower learn (it shares the encoder's parameters:
a detector holding the same encoder then trains it too).
"""
from typing import Dict, Sequence

import torch
from torch import nn


class TokenFeatureEncoder(nn.Module):
    """Token ids ``[N, L]`` (the tokenizer's output: start-of-text, tokens, end-of-text,
    zeros) -> ``{"tokens": [N, L, D], "mask": [N, L] bool, "eot": [N, D]}``.

    ``tokens[n, i]`` is position ``i``'s output projected to the joint space (``D`` =
    ``encoder.embed_dim``), zero after the end-of-text token; ``mask`` is True from
    start-of-text to end-of-text; ``eot`` equals ``encoder(token_ids)`` (open_clip's
    ``encode_text``). Features are not normalised. With a causal text tower (CLIP's) the
    positions after the longest text's end-of-text token are not computed: they cannot
    change the others.
    """

    def __init__(self, encoder: nn.Module, trainable: bool = False):
        super().__init__()
        for attr in ("token_embedding", "transformer", "ln_final", "text_projection", "tokenizer"):
            if not hasattr(encoder, attr):
                raise TypeError(f"{type(encoder).__name__} lacks {attr!r}: give a LanguageEncoder "
                                "(regionclip_d2.modeling.text.build_language_encoder)")
        self.encoder = encoder
        self.trainable = bool(trainable)
        for p in self.encoder.parameters():
            p.requires_grad = self.trainable
        if not self.trainable:
            self.encoder.eval()

    @property
    def embed_dim(self) -> int:
        return int(self.encoder.text_projection.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.encoder.context_length)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.trainable:
            self.encoder.eval()  # frozen: dropout off whatever the caller's mode
        return self

    def forward(self, token_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        if token_ids.dim() != 2:
            raise ValueError(f"token ids of shape {tuple(token_ids.shape)}: expected [N, L]")
        token_ids = token_ids.to(self.encoder.token_embedding.weight.device)
        n, length = token_ids.shape
        eot_pos = token_ids.argmax(dim=-1)  # end-of-text has the largest id of CLIP's vocabulary
        used = int(eot_pos.max()) + 1 if n else 0
        if getattr(self.encoder, "attn_mask", None) is None:
            used = length  # bidirectional attention: padding matters, compute all of it
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            eot, per_token = self.encoder(token_ids[:, :used], all_tokens=True)
        mask = torch.arange(length, device=token_ids.device)[None, :] <= eot_pos[:, None]
        tokens = per_token.new_zeros(n, length, per_token.shape[-1])
        tokens[:, :used] = per_token * mask[:, :used, None].to(per_token.dtype)
        return {"tokens": tokens, "mask": mask, "eot": eot}

    def encode_prompts(self, prompts: Sequence) -> Dict[str, torch.Tensor]:
        """Encode :class:`~regionclip_d2.grounding.prompts.GroundingPrompt` s (their ``token_ids``)."""
        if not prompts:
            raise ValueError("no prompts to encode")
        ids = torch.stack([p.token_ids for p in prompts])
        if ids.shape[1] != self.context_length:
            raise ValueError(f"prompts built for a context of {ids.shape[1]} tokens, the text tower's is "
                             f"{self.context_length}: build them with context_length={self.context_length}")
        return self(ids)


def token_features(encoder: nn.Module, token_ids: torch.Tensor, trainable: bool = False) -> Dict[str, torch.Tensor]:
    """One call of :class:`TokenFeatureEncoder` (``trainable`` also sets the encoder's
    ``requires_grad``)."""
    return TokenFeatureEncoder(encoder, trainable=trainable)(token_ids)
