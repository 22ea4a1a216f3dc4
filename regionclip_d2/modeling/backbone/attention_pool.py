"""CLIP's attention pool applied to region feature maps.

CLIP ResNets end in an attention pool: the mean of the spatial tokens is prepended
as a query token, positional embeddings are added, and one multi-head attention
step returns that query token's output, projected to the joint embedding space.
For regions we (a) interpolate the positional embedding when the pooled grid is not
the model's native grid and (b) compute only the one query that is kept, which is
exact (the other tokens' outputs are discarded anyway) and cheaper.
"""
import math

import torch
import torch.nn.functional as F


def interpolate_positional_embedding(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Resize CLIP's attention-pool positional embedding to an ``h x w`` grid.

    Args:
        pos: ``[1 + S*S, C]``: the mean token's embedding, then an ``S x S`` grid.
    Returns:
        ``[1 + h*w, C]``; ``pos`` itself when the grid already matches.
    """
    n = pos.shape[0] - 1
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"attention-pool positional embedding has {n} spatial tokens, not a square")
    if side == h and side == w:
        return pos
    grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False)
    grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(h * w, -1)
    return torch.cat([pos[:1], grid], dim=0)


def attention_pool(attnpool, x: torch.Tensor) -> torch.Tensor:
    """Run CLIP's attention pool on feature maps.

    Args:
        attnpool: an open_clip ``AttentionPool2d`` (``positional_embedding``,
            ``q_proj``, ``k_proj``, ``v_proj``, ``c_proj``, ``num_heads``).
        x: ``[N, C, H, W]`` feature maps (e.g. res5 of N regions).
    Returns:
        ``[N, D]`` pooled embeddings (not normalised).
    """
    n, c, h, w = x.shape
    tokens = x.flatten(2).permute(2, 0, 1)  # [HW, N, C]
    tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0)  # [HW+1, N, C]
    pos = interpolate_positional_embedding(attnpool.positional_embedding, h, w)
    tokens = tokens + pos[:, None, :].to(tokens.dtype)
    heads = attnpool.num_heads
    head_dim = c // heads
    # One query (the mean token); keys and values over all tokens.
    q = F.linear(tokens[:1], attnpool.q_proj.weight, attnpool.q_proj.bias)  # [1, N, C]
    k = F.linear(tokens, attnpool.k_proj.weight, attnpool.k_proj.bias)  # [L, N, C]
    v = F.linear(tokens, attnpool.v_proj.weight, attnpool.v_proj.bias)
    length = tokens.shape[0]
    q = q.reshape(1, n * heads, head_dim).transpose(0, 1)  # [N*heads, 1, hd]
    k = k.reshape(length, n * heads, head_dim).transpose(0, 1)  # [N*heads, L, hd]
    v = v.reshape(length, n * heads, head_dim).transpose(0, 1)
    out = F.scaled_dot_product_attention(q, k, v)  # [N*heads, 1, hd]
    out = out.transpose(0, 1).reshape(n, c)
    return F.linear(out, attnpool.c_proj.weight, attnpool.c_proj.bias)
