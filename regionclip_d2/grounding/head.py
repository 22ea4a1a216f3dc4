"""GLIP's grounding head pieces (issue 14, point 2), independent of a detector.

- :class:`RegionTokenAlignment`: region-token alignment logits ``S = O P^T`` with a learned
  scale and bias (GLIP's classification logits; a region's class logits become its scores
  against the prompt's tokens).
- :func:`class_scores`: a class's (phrase's) score from its tokens' probabilities, the mean
  or the max over the phrase's token span.
- :func:`token_targets` and :func:`grounding_focal_loss`: token-level targets of matched
  regions and the sigmoid focal loss over valid (non-padding) tokens.
- :class:`BiCrossAttentionLayer` / :class:`DeepFusion`: ``L`` layers of bidirectional
  cross-modal multi-head attention between visual tokens and text tokens (one attention
  matrix, used row-wise for vision <- text and column-wise for text <- vision, as GLIP
  does), with layer scale; ``L = 0`` is late fusion (identity).

The visual side is any sequence of visual tokens ``[N, S, D_v]``: a flattened feature map
(GLIP fuses on the FPN levels) or the regions' pooled features. Wiring these into the C4 /
FPN detectors, configs and training is the next step of issue 14; see the module docstring
of :mod:`regionclip_d2.grounding`.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RegionTokenAlignment", "class_scores", "token_targets", "grounding_focal_loss",
           "BiCrossAttentionLayer", "DeepFusion"]

# logit written at padding positions: exp(-1e4) underflows to 0 in fp32 and bf16 without NaN
MASKED_LOGIT = -1.0e4


def _check_tokens(tokens: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if tokens.dim() != 3:
        raise ValueError(f"token features of shape {tuple(tokens.shape)}: expected [N, T, D]")
    if mask is None:
        return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    if mask.shape != tokens.shape[:2]:
        raise ValueError(f"token mask of shape {tuple(mask.shape)} does not match the token features "
                         f"{tuple(tokens.shape[:2])}: give one flag per token (True = a real token)")
    return mask.bool()


class RegionTokenAlignment(nn.Module):
    """``logits[n, r, t] = scale * cos(W_v o_{n,r}, W_t p_{n,t}) + bias``.

    Both sides are projected to ``dim`` and L2-normalised; ``scale`` (stored as its log) and
    ``bias`` are learned. The bias starts at ``-log((1 - prior_prob) / prior_prob)`` so that
    every token starts with probability about ``prior_prob`` (the focal-loss initialisation of
    RetinaNet and GLIP), and the scale at ``init_scale``. Padding tokens get
    :data:`MASKED_LOGIT`.
    """

    def __init__(self, visual_dim: int, text_dim: int, dim: int = 256, prior_prob: float = 0.01,
                 init_scale: float = 10.0, init: str = "random"):
        super().__init__()
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"prior_prob={prior_prob}: use a probability in (0, 1)")
        if init_scale <= 0:
            raise ValueError(f"init_scale={init_scale}: the logit scale must be positive")
        if init not in ("random", "identity"):
            raise ValueError(f"init={init!r}: use 'random' or 'identity'")
        if init == "identity" and not visual_dim == text_dim == dim:
            raise ValueError(f"an identity start needs equal widths, but regions have {visual_dim}, tokens {text_dim} "
                             f"and the alignment {dim}: set MODEL.GROUNDING.ALIGN_DIM {text_dim} (the CLIP "
                             "embedding width) or ALIGN_INIT random")
        self.visual_proj = nn.Linear(visual_dim, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        if init == "identity":  # the alignment starts as the cosine of the two (CLIP-aligned) spaces
            for proj in (self.visual_proj, self.text_proj):
                nn.init.eye_(proj.weight)
                nn.init.zeros_(proj.bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = nn.Parameter(torch.tensor(-math.log((1.0 - prior_prob) / prior_prob)))

    def forward(self, regions: torch.Tensor, tokens: torch.Tensor,
                token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            regions: ``[N, R, D_v]`` region (or visual token) features of N images.
            tokens: ``[N, T, D_t]`` token features of each image's prompt.
            token_mask: ``[N, T]`` True at real tokens (None: all real).
        Returns:
            ``[N, R, T]`` logits.
        """
        mask = _check_tokens(tokens, token_mask)
        if regions.dim() != 3 or regions.shape[0] != tokens.shape[0]:
            raise ValueError(f"region features of shape {tuple(regions.shape)} for {tokens.shape[0]} prompts: "
                             "expected [N, R, D] with one prompt per image")
        o = F.normalize(self.visual_proj(regions), dim=-1)
        p = F.normalize(self.text_proj(tokens), dim=-1)
        logits = torch.einsum("nrd,ntd->nrt", o, p) * self.log_scale.exp() + self.bias
        return logits.masked_fill(~mask[:, None, :], MASKED_LOGIT)


def class_scores(token_logits: torch.Tensor, positive_map: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Class (phrase) probabilities from token logits.

    Args:
        token_logits: ``[..., T]``.
        positive_map: ``[C, T]``, 1 on each class's token span (``GroundingPrompt.positive_map()``).
        reduce: ``"mean"`` (GLIP's default) or ``"max"`` of the span's token probabilities, or
            ``"last"``: the probability of the span's last token, the one that has read the
            whole phrase in a causal text tower such as CLIP's (its earlier tokens have not
            seen the words after them: "a" of "a star" is "a" of "a moon").
    Returns:
        ``[..., C]`` probabilities in [0, 1].
    """
    if positive_map.dim() != 2 or positive_map.shape[1] != token_logits.shape[-1]:
        raise ValueError(f"positive map of shape {tuple(positive_map.shape)} for {token_logits.shape[-1]} tokens: "
                         "expected [num_classes, T] over the same context")
    pm = (positive_map > 0).to(token_logits.dtype)
    if bool((pm.sum(dim=1) == 0).any()):
        raise ValueError("a class has no tokens in the positive map: every class needs a non-empty span")
    prob = token_logits.sigmoid()
    if reduce == "mean":
        return prob @ (pm / pm.sum(dim=1, keepdim=True)).t()
    if reduce == "max":
        return (prob.unsqueeze(-2) * pm).amax(dim=-1)  # probabilities are >= 0, so zeros never win wrongly
    if reduce == "last":
        last = pm.shape[1] - 1 - pm.flip(dims=[1]).argmax(dim=1)  # each class's last token
        return prob[..., last]
    raise ValueError(f"reduce={reduce!r}: use 'mean', 'max' or 'last'")


def token_targets(labels: torch.Tensor, positive_map: torch.Tensor) -> torch.Tensor:
    """Token-level targets of regions: the row of ``positive_map`` of each region's class
    (binarised), zeros for background (a label < 0 or >= the number of classes, as
    detectron2 marks background with ``num_classes``).

    Args:
        labels: ``[R]`` class indices.
        positive_map: ``[C, T]``.
    Returns:
        ``[R, T]`` float targets.
    """
    num_classes, length = positive_map.shape
    fg = (labels >= 0) & (labels < num_classes)
    out = positive_map.new_zeros(labels.shape[0], length)
    out[fg] = (positive_map[labels[fg]] > 0).to(out.dtype)
    return out


def grounding_focal_loss(logits: torch.Tensor, targets: torch.Tensor, token_mask: Optional[torch.Tensor] = None,
                         alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss over the valid tokens, summed and divided by the number of regions
    with at least one positive token (at least 1), as detection focal losses normalise.

    Args:
        logits, targets: ``[N, R, T]`` (or ``[R, T]``).
        token_mask: ``[N, T]`` (or ``[T]``), True at real tokens; padding adds nothing. A mask
            of the logits' own shape masks each region's tokens on its own (regions of images
            with different prompts, words left out of the loss).
    """
    from torchvision.ops import sigmoid_focal_loss

    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    loss = sigmoid_focal_loss(logits.float(), targets.float(), alpha=alpha, gamma=gamma, reduction="none")
    if token_mask is not None:
        m = token_mask if token_mask.shape == loss.shape else token_mask.unsqueeze(-2)
        loss = loss * m.to(loss.dtype)
    num_pos = (targets > 0).any(dim=-1).sum().clamp(min=1)
    return loss.sum() / num_pos


class BiCrossAttentionLayer(nn.Module):
    """One bidirectional cross-attention layer between visual tokens ``v`` and text tokens
    ``t`` (pre-norm, residual, layer scale ``gamma``).

    One attention matrix ``A = q(v) k(t)^T / sqrt(d_head)`` per head; the visual side takes
    ``softmax_t(A) v(t)``, the text side ``softmax_v(A^T) v(v)``. Padding tokens are never
    attended to, and padding visual tokens (``visual_mask``) neither.
    """

    def __init__(self, visual_dim: int, text_dim: int, embed_dim: int = 256, num_heads: int = 8,
                 dropout: float = 0.0, init_gamma: float = 1e-4):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.norm_v, self.norm_t = nn.LayerNorm(visual_dim), nn.LayerNorm(text_dim)
        self.q_v = nn.Linear(visual_dim, embed_dim)
        self.k_t = nn.Linear(text_dim, embed_dim)
        self.val_v = nn.Linear(visual_dim, embed_dim)
        self.val_t = nn.Linear(text_dim, embed_dim)
        self.out_v = nn.Linear(embed_dim, visual_dim)
        self.out_t = nn.Linear(embed_dim, text_dim)
        self.dropout = nn.Dropout(dropout)
        self.gamma_v = nn.Parameter(torch.full((visual_dim,), float(init_gamma)))
        self.gamma_t = nn.Parameter(torch.full((text_dim,), float(init_gamma)))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, s, _ = x.shape
        return x.view(n, s, self.num_heads, self.head_dim).transpose(1, 2)  # [N, H, S, d]

    def forward(self, v: torch.Tensor, t: torch.Tensor, token_mask: Optional[torch.Tensor] = None,
                visual_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        tmask = _check_tokens(t, token_mask)
        vmask = _check_tokens(v, visual_mask)
        n, sv, _ = v.shape
        vn, tn = self.norm_v(v), self.norm_t(t)
        attn = self._heads(self.q_v(vn)) @ self._heads(self.k_t(tn)).transpose(-1, -2) / math.sqrt(self.head_dim)
        # vision <- text: each visual token over the real text tokens
        a_v = attn.masked_fill(~tmask[:, None, None, :], float("-inf")).softmax(dim=-1)
        # text <- vision: each text token over the real visual tokens
        a_t = attn.transpose(-1, -2).masked_fill(~vmask[:, None, None, :], float("-inf")).softmax(dim=-1)
        dv = (self.dropout(a_v) @ self._heads(self.val_t(tn))).transpose(1, 2).reshape(n, sv, -1)
        dt = (self.dropout(a_t) @ self._heads(self.val_v(vn))).transpose(1, 2).reshape(n, t.shape[1], -1)
        return v + self.gamma_v * self.out_v(dv), t + self.gamma_t * self.out_t(dt)


class DeepFusion(nn.Module):
    """``num_layers`` :class:`BiCrossAttentionLayer` s; ``num_layers = 0`` returns the inputs
    unchanged (late fusion: the alignment alone relates the two sides)."""

    def __init__(self, visual_dim: int, text_dim: int, num_layers: int = 1, **layer_kwargs):
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers={num_layers}: use 0 (late fusion) or more")
        self.layers = nn.ModuleList(BiCrossAttentionLayer(visual_dim, text_dim, **layer_kwargs)
                                    for _ in range(num_layers))

    def forward(self, v: torch.Tensor, t: torch.Tensor, token_mask: Optional[torch.Tensor] = None,
                visual_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        for layer in self.layers:
            v, t = layer(v, t, token_mask, visual_mask)
        return v, t
