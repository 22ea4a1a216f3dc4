"""Folding frozen BatchNorms into the convolutions before them, for inference.

Used by the detectors' inference with ``MODEL.CLIP.FOLD_BATCHNORM`` (on by default; the copies
are channels-last on CPU; measured by ``bench/fold_frozen_bn.py`` and ``bench/run.py``, see the
README's speed section).

A ``FrozenBatchNorm2d`` after a convolution is a fixed per-channel affine map,
``y = x * s + t`` with ``s = weight / sqrt(running_var + eps)`` and ``t = bias - running_mean * s``,
so ``bn(conv(x)) = conv'(x)`` with ``W' = W * s`` (per output channel) and ``b' = b * s + t``.
The folded network skips one pass over every feature map per convolution.

Folding changes parameters and drops the BatchNorms' buffers, so it is applied to a copy of
a module (:func:`folded_copy`); the model keeps its own modules, state-dict keys and training
behaviour. Three patterns are recognised, which cover the CLIP ResNets (open_clip's
``ModifiedResNet``: ``convK`` followed by ``bnK`` in the stem and each bottleneck, and
``downsample = Sequential(AvgPool2d, Conv2d, BatchNorm)``) and detectron2's ResNets (its
``Conv2d`` with a ``norm`` attribute):

1. a detectron2 ``Conv2d`` whose ``norm`` is a ``FrozenBatchNorm2d``;
2. sibling children ``convK`` and ``bnK`` (same suffix) of one module, when that module's
   forward applies ``bnK`` directly to ``convK``'s output (true of the modules listed above;
   :func:`fold_frozen_batchnorm` only folds module types it knows to do so);
3. consecutive ``Conv2d`` and ``FrozenBatchNorm2d`` children of an ``nn.Sequential``.
"""
import copy
from typing import Tuple

import torch
from torch import nn

from detectron2.layers import Conv2d as D2Conv2d
from detectron2.layers import FrozenBatchNorm2d

__all__ = ["fold_frozen_batchnorm", "folded_copy"]

# modules whose forward applies bnK right after convK (open_clip's ModifiedResNet pieces and this
# project's CLIPResNet, whose stem is written the same way)
_PAIRED_TYPES = ("Bottleneck", "ModifiedResNet", "CLIPResNet")


def _is_fixed_bn(m: nn.Module) -> bool:
    """A BatchNorm that is a fixed affine map: frozen, or a BatchNorm2d in eval mode with running stats."""
    if isinstance(m, FrozenBatchNorm2d):
        return True
    return isinstance(m, nn.BatchNorm2d) and not m.training and m.track_running_stats and m.running_var is not None


def _affine(bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    var, mean = bn.running_var.float(), bn.running_mean.float()
    weight = bn.weight.float() if bn.weight is not None else torch.ones_like(var)
    bias = bn.bias.float() if bn.bias is not None else torch.zeros_like(var)
    scale = weight * (var + bn.eps).rsqrt()
    return scale, bias - mean * scale


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.Module):
    if conv.weight.shape[0] != bn.weight.shape[0]:
        raise ValueError(f"cannot fold a BatchNorm of {bn.weight.shape[0]} channels into a convolution with "
                         f"{conv.weight.shape[0]} outputs")
    scale, shift = _affine(bn)
    w = conv.weight.detach().float() * scale.float().view(-1, 1, 1, 1)
    b = shift.float() if conv.bias is None else conv.bias.detach().float() * scale.float() + shift.float()
    conv.weight = nn.Parameter(w.to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=False)


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Fold, in place, every fixed BatchNorm of ``module`` (a ``FrozenBatchNorm2d``, or a
    ``BatchNorm2d`` in eval mode, e.g. a trained RPN branch's) that directly follows a
    convolution (the patterns in this module's docstring); each folded BatchNorm becomes an
    ``nn.Identity`` (or, for detectron2's ``Conv2d``, ``norm = None``). Returns how many were
    folded. Use it on a copy (:func:`folded_copy`) of a model that still trains or saves."""
    folded = 0
    for parent in list(module.modules()):
        if isinstance(parent, D2Conv2d) and _is_fixed_bn(getattr(parent, "norm", None)):
            _fold_into(parent, parent.norm)
            parent.norm = None
            folded += 1
            continue
        children = dict(parent.named_children())
        if type(parent).__name__ in _PAIRED_TYPES:
            for name, child in children.items():
                if name.startswith("bn") and _is_fixed_bn(child):
                    conv = children.get("conv" + name[2:])
                    if isinstance(conv, nn.Conv2d) and not isinstance(conv, D2Conv2d):
                        _fold_into(conv, child)
                        setattr(parent, name, nn.Identity())
                        folded += 1
        if isinstance(parent, nn.Sequential):
            items = list(children.items())
            for (_, a), (name_b, b) in zip(items, items[1:]):
                if isinstance(a, nn.Conv2d) and not isinstance(a, D2Conv2d) and _is_fixed_bn(b):
                    _fold_into(a, b)
                    setattr(parent, name_b, nn.Identity())
                    folded += 1
    return folded


def folded_copy(module: nn.Module, channels_last: bool = False) -> nn.Module:
    """A copy of ``module`` in eval mode with its fixed BatchNorms folded (see
    :func:`fold_frozen_batchnorm`), for inference.

    The copy shares every parameter and buffer that folding leaves as it is (the attention pool,
    FPN convolutions without a norm, ...): only the folded convolutions' weights are new, so the
    copy costs the memory of those weights. The shared tensors are not changed (folding assigns
    new parameters), so the original keeps its values, memory format and ``requires_grad``. With
    ``channels_last`` every 4-D convolution weight of the copy is in channels-last memory format
    (a channels-last copy where it is shared), which makes convolutions run in that format: on
    CPU, oneDNN's fast layout.
    """
    shared = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    out = copy.deepcopy(module, memo=shared)
    out.eval()
    fold_frozen_batchnorm(out)
    if channels_last:
        for m in out.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.is_contiguous(memory_format=torch.channels_last):
                m.weight = nn.Parameter(m.weight.detach().contiguous(memory_format=torch.channels_last),
                                        requires_grad=False)
    return out
