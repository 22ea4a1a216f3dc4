"""CLIP's VisionTransformer as a detectron2 Backbone: a dense map for CLIPSelf, a simple
feature pyramid for detection (docs/method.md, "CLIPSelf").

:class:`CLIPViT` adopts the submodules of open_clip's ``VisionTransformer`` under their own
names (``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``, ``transformer``,
``ln_post``, ``proj``), so an OpenAI / OpenCLIP state dict (``visual.*``) maps onto it key
for key.

Any input size: the positional embedding of the native ``g_h x g_w`` patch grid is resized
bicubically (``align_corners=False``) to the input's ``H/p x W/p`` grid; the [CLS] position
is kept as it is. At the native size the embedding is used unchanged.

Two read-outs of the same tokens ``x`` entering the last block (``x_0`` the [CLS] token,
``x_i`` the patch tokens, after the embedding, ``ln_pre`` and all blocks but the last):

* image embedding (:meth:`CLIPViT.encode_image`): the last block as it is, then the pool
  (the [CLS] token, or the mean of the patch tokens for ``pool_type='avg'``), ``ln_post``,
  ``proj``: open_clip's ``encode_image`` exactly;
* dense map (:meth:`CLIPViT.forward`, feature ``"dense"``): the last block's value path
  only, per patch token, without query-key attention (CLIPSelf's "forward without
  attention", MaskCLIP style)::

      v_i = W_o (W_v LN_1(x_i) + b_v) + b_o            (value, then output projection)
      y_i = x_i + ls_1(v_i)                            (residual; ls_1 = LayerScale or identity)
      z_i = y_i + ls_2(MLP(LN_2(y_i)))                 (the block's MLP with its residual)
      f_i = LN_post(z_i) @ proj                        (into the joint embedding space)

  which is the last block run with an attention matrix equal to the identity (each token
  attends only to itself). The map is ``[B, D, H/p, W/p]`` (``D`` the joint dimension).
"""
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from ..clip_model import build_vit_tower

_ADOPTED = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")


class ImageTooSmallError(ValueError):
    pass


def interpolate_vit_positional_embedding(pos: torch.Tensor, native_grid: Tuple[int, int],
                                         grid: Tuple[int, int]) -> torch.Tensor:
    """Resize a ViT positional embedding ``[1 + gh0*gw0, C]`` ([CLS] first, then the native
    grid row by row) to ``[1 + gh*gw, C]``: the grid part bicubically (``align_corners=False``),
    the [CLS] position unchanged. ``pos`` itself when the grid is the native one."""
    gh0, gw0 = native_grid
    gh, gw = grid
    if pos.shape[0] != 1 + gh0 * gw0:
        raise ValueError(f"positional embedding has {pos.shape[0]} positions, expected 1 + {gh0}x{gw0}")
    if (gh, gw) == (gh0, gw0):
        return pos
    spatial = pos[1:].reshape(1, gh0, gw0, -1).permute(0, 3, 1, 2)
    spatial = F.interpolate(spatial.float(), size=(gh, gw), mode="bicubic", align_corners=False)
    spatial = spatial.to(pos.dtype).permute(0, 2, 3, 1).reshape(gh * gw, -1)
    return torch.cat([pos[:1], spatial], dim=0)


def value_path(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An open_clip ``ResidualAttentionBlock`` applied to tokens ``x`` ``[B, L, C]`` without
    query-key attention (see the module docstring): ``y = x + ls_1(W_o(W_v LN_1(x) + b_v) + b_o)``,
    then ``y + ls_2(MLP(LN_2(y)))``."""
    attn = block.attn
    c = attn.embed_dim
    if attn.in_proj_weight is not None:
        w_v, b_v = attn.in_proj_weight[2 * c:], None if attn.in_proj_bias is None else attn.in_proj_bias[2 * c:]
    else:  # separate projections (kdim / vdim set)
        w_v, b_v = attn.v_proj_weight, None if attn.in_proj_bias is None else attn.in_proj_bias[2 * c:]
    v = F.linear(block.ln_1(x), w_v, b_v)
    v = F.linear(v, attn.out_proj.weight, attn.out_proj.bias)
    y = x + block.ls_1(v)
    return y + block.ls_2(block.mlp(block.ln_2(y)))


class CLIPViT(Backbone):
    """CLIP VisionTransformer with detectron2's Backbone interface.

    Args:
        visual: an open_clip ``VisionTransformer`` (weights are taken over, not copied) with
            the default residual blocks and no attentional pooler.
        out_features: ``["dense"]`` (the only map): ``[B, D, H/p, W/p]``, stride ``p``.
        freeze: no gradients for any weight (the frozen ViT of F-ViT).

    Input: ``[B, 3, H, W]`` CLIP-normalised RGB with ``H, W >= p``; a size that is not a
    multiple of ``p`` loses its last ``H mod p`` rows (``W mod p`` columns), as the patch
    convolution floors (detectron2 pads batches to ``size_divisibility = p``).
    """

    def __init__(self, visual: nn.Module, out_features: Sequence[str] = ("dense",), freeze: bool = False):
        super().__init__()
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("CLIP ViT backbone: towers with an attentional pooler (CoCa) have no [CLS] path to "
                             "distil; use a plain CLIP ViT (e.g. ViT-B-16)")
        blocks = visual.transformer.resblocks
        if not all(hasattr(b, "attn") and isinstance(b.attn, nn.MultiheadAttention) for b in blocks):
            raise ValueError("CLIP ViT backbone: the tower uses open_clip's custom attention blocks (qk_norm, "
                             "scaled cosine attention, ...), whose value path is not implemented; use a model "
                             "with the default blocks (OpenAI / OpenCLIP ViTs)")
        for name in _ADOPTED:
            setattr(self, name, getattr(visual, name))
        self.pool_type = visual.pool_type
        self.final_ln_after_pool = visual.final_ln_after_pool
        self.native_grid = tuple(visual.grid_size)
        self.image_size = tuple(visual.image_size)
        self.patch_size = int(visual.patch_size[0])
        if visual.patch_size[0] != visual.patch_size[1]:
            raise ValueError(f"CLIP ViT backbone: non-square patches {visual.patch_size} are not supported")
        if list(out_features) != ["dense"]:
            raise ValueError(f"CLIP ViT out_features {list(out_features)} invalid: the ViT has one map, 'dense'")
        self._out_features = ["dense"]
        self._out_feature_channels = {"dense": self.embed_dim}
        self._out_feature_strides = {"dense": self.patch_size}
        if freeze:
            self.freeze()

    @property
    def embed_dim(self) -> int:
        """Dimension of CLIP's joint embedding space (the dense map's channels)."""
        return self.proj.shape[1]

    @property
    def width(self) -> int:
        return self.conv1.out_channels

    @property
    def size_divisibility(self) -> int:
        return self.patch_size

    def freeze(self):
        for p in self.parameters():
            p.requires_grad = False
        return self

    # ------------------------------------------------------------------ tokens
    def grid(self, h: int, w: int) -> Tuple[int, int]:
        """The patch grid of an ``h x w`` input; an input smaller than one patch is an error."""
        p = self.patch_size
        if h < p or w < p:
            raise ImageTooSmallError(
                f"an image of {h}x{w} pixels is smaller than one {p}x{p} patch of the CLIP ViT: resize the images "
                f"to at least {p} pixels a side (INPUT.MIN_SIZE_TRAIN / MIN_SIZE_TEST) or drop them from the data")
        return h // p, w // p

    def positional_embedding_for(self, gh: int, gw: int) -> torch.Tensor:
        """``[1 + gh*gw, C]``: the positional embedding resized to a ``gh x gw`` grid."""
        return interpolate_vit_positional_embedding(self.positional_embedding, self.native_grid, (gh, gw))

    def penultimate_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """``[B, 1 + gh*gw, C]``: the tokens entering the last block ([CLS] first), and the grid."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"CLIP ViT takes [B, 3, H, W] images, got shape {tuple(x.shape)}")
        gh, gw = self.grid(*x.shape[-2:])
        x = self.conv1(x.to(self.conv1.weight.dtype))  # [B, C, gh, gw]
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding_for(gh, gw).to(x.dtype)
        x = self.ln_pre(x)
        batch_first = getattr(self.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in self.transformer.resblocks[:-1]:
            x = block(x)
        if not batch_first:
            x = x.transpose(0, 1)
        return x, (gh, gw)

    def _last_block(self, x: torch.Tensor) -> torch.Tensor:
        block = self.transformer.resblocks[-1]
        if getattr(self.transformer, "batch_first", True):
            return block(x)
        return block(x.transpose(0, 1)).transpose(0, 1)

    # ------------------------------------------------------------------ read-outs
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Image embedding ``[B, D]`` (not normalised); open_clip's ``encode_image`` at the
        native size, and at other sizes with the interpolated positional embedding."""
        tokens, _ = self.penultimate_tokens(x)
        tokens = self._last_block(tokens)
        if self.final_ln_after_pool:
            return self.ln_post(self._pool(tokens)) @ self.proj
        return self._pool(self.ln_post(tokens)) @ self.proj

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "avg":
            return tokens[:, 1:].mean(dim=1)
        if self.pool_type == "tok":
            return tokens[:, 0]
        raise ValueError(f"CLIP ViT pool_type {self.pool_type!r} has no image embedding: use 'tok' or 'avg'")

    def dense_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]``: the value path of the last block, ``ln_post`` and ``proj`` on patch tokens."""
        z = value_path(self.transformer.resblocks[-1], tokens[:, 1:])
        return self.ln_post(z) @ self.proj

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``[B, 3, H, W]`` -> ``{"dense": [B, D, H/p, W/p]}``."""
        tokens, (gh, gw) = self.penultimate_tokens(x)
        dense = self.dense_tokens(tokens)
        return {"dense": dense.transpose(1, 2).reshape(dense.shape[0], -1, gh, gw)}


class CLIPViTSimpleFeaturePyramid(Backbone):
    """A ViTDet-style simple feature pyramid on the CLIP ViT's dense map (``bottom_up``):
    from the stride-``p`` map, a 2x2 transposed convolution (stride ``p/2``), the map itself
    (``p``) and a 2x2 max pool (``2p``), each followed by a 1x1 and a 3x3 convolution to
    ``out_channels`` (with ``norm``); a max-pooled extra level (``4p``) as in detectron2's FPN.
    For ``p = 16``: strides 8, 16, 32, 64, features ``p3`` .. ``p6`` (named ``p<round(log2
    stride)>``)."""

    def __init__(self, bottom_up: CLIPViT, out_channels: int = 256, norm: str = "",
                 scale_factors: Sequence[float] = (2.0, 1.0, 0.5)):
        super().__init__()
        self.bottom_up = bottom_up
        dim = bottom_up.embed_dim
        stride0 = bottom_up.patch_size
        self._out_features, self._out_feature_strides, self._out_feature_channels = [], {}, {}
        self.stages = nn.ModuleList()
        for scale in scale_factors:
            if scale == 2.0:
                layers = [nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)]
            elif scale == 1.0:
                layers = []
            elif scale == 0.5:
                layers = [nn.MaxPool2d(kernel_size=2, stride=2)]
            else:
                raise ValueError(f"simple feature pyramid scale {scale} not supported: use 2.0, 1.0 or 0.5")
            layers += [Conv2d(dim, out_channels, kernel_size=1, bias=not norm, norm=get_norm(norm, out_channels)),
                       Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=not norm,
                              norm=get_norm(norm, out_channels))]
            self.stages.append(nn.Sequential(*layers))
            stride = stride0 / scale
            self._add_level(stride, out_channels)
        self.top_block = LastLevelMaxPool()
        self._add_level(stride0 / scale_factors[-1] * 2, out_channels)
        self._size_divisibility = int(stride0 / scale_factors[-1] * 2)

    def _add_level(self, stride: float, channels: int):
        name = f"p{int(round(math.log2(stride)))}"
        if name in self._out_feature_strides:
            raise ValueError(f"simple feature pyramid: two levels would be named {name}")
        self._out_features.append(name)
        self._out_feature_strides[name] = int(round(stride))
        self._out_feature_channels[name] = channels

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        dense = self.bottom_up(x)["dense"]
        outs: List[torch.Tensor] = [stage(dense) for stage in self.stages]
        outs.extend(self.top_block(outs[-1]))
        return dict(zip(self._out_features, outs))


def clip_vit_from_cfg(cfg, freeze: bool = None) -> CLIPViT:
    """The CLIP ViT named by ``MODEL.CLIP.OPENCLIP_MODEL`` / ``OPENCLIP_MODEL_CONFIG`` (random
    weights; the caller loads them). ``freeze`` default: ``MODEL.BACKBONE.FREEZE_AT > 0`` (the
    whole ViT frozen; the ViT has no stages to freeze one by one)."""
    visual, _ = build_vit_tower(cfg.MODEL.CLIP.OPENCLIP_MODEL, cfg.MODEL.CLIP.OPENCLIP_MODEL_CONFIG)
    if freeze is None:
        freeze = cfg.MODEL.BACKBONE.FREEZE_AT > 0
    return CLIPViT(visual, freeze=freeze)


def _check_channels(input_shape: ShapeSpec):
    if input_shape.channels != 3:
        raise ValueError(f"CLIP ViTs take 3-channel images, config gives {input_shape.channels}")


@BACKBONE_REGISTRY.register()
def build_clip_vit_backbone(cfg, input_shape: ShapeSpec):
    """The CLIP ViT returning its dense map ``"dense"`` (stride = patch size)."""
    _check_channels(input_shape)
    return clip_vit_from_cfg(cfg)


@BACKBONE_REGISTRY.register()
def build_clip_vit_sfp_backbone(cfg, input_shape: ShapeSpec):
    """A simple feature pyramid (``MODEL.FPN.OUT_CHANNELS``, ``MODEL.FPN.NORM``) on the CLIP
    ViT's dense map; the ViT is ``backbone.bottom_up``."""
    _check_channels(input_shape)
    return CLIPViTSimpleFeaturePyramid(clip_vit_from_cfg(cfg), out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
                                       norm=cfg.MODEL.FPN.NORM)
