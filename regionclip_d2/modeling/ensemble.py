"""Detection scores ensembled with a frozen CLIP region classifier (opt-in, inference only).

Not part of the official RegionCLIP. A detector fine-tuned on base classes learns to call
everything else background, novel objects in its training images included, so on a novel
object its base classes outscore the novel name it was never trained against (in the
synthetic demo the top-scoring detection names 1% of the novel test objects right, while the
pretrained model it started from classifies 37% of their boxes right zero-shot). ViLD (its "ensemble"), F-VLM
and CLIPSelf's F-ViT combine the detector's class probabilities with those of a frozen
CLIP-style region classifier, geometrically, with a larger share of the frozen model for the
classes the detector never saw:

    score_c = p_det_c ** (1 - lambda_c) * p_zs_c ** lambda_c,
    lambda_c = alpha for the base classes (in the training vocabulary), beta for the others.

``p_zs`` is the frozen model's softmax over the test vocabulary (no background) of the
cosines of its region embeddings (RoIAlign on its res4, res5, attention pool: the C4 path
of pretraining) with the class embeddings, at the detector's temperature. The background
probability stays the detector's. With ``MODEL.CLIP.ENSEMBLE_WEIGHTS`` (a CLIP file, or a
RegionCLIP checkpoint such as the pretrained student) the detector builds this frozen
model; ``MODEL.CLIP.ENSEMBLE_ALPHA`` / ``ENSEMBLE_BETA`` (F-VLM's 0.35 / 0.65) set the shares.
"""
import math
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes

from .poolers import thread_roi_align


def ensemble_probs(det_probs: torch.Tensor, zs_probs: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``[R, C+1]`` detector probabilities (background last), ``[R, C]`` frozen-model
    probabilities and ``[C]`` (or ``[R, C]``) shares ``lambda`` -> ``[R, C+1]`` ensembled scores
    ``det^(1-lambda) * zs^lambda`` per class, the detector's background column unchanged."""
    c = zs_probs.shape[1]
    if det_probs.shape[1] != c + 1:
        raise ValueError(f"the detector scores {det_probs.shape[1] - 1} classes but the ensemble's frozen model "
                         f"{c}: both must score the test vocabulary")
    cls = det_probs[:, :c].clamp_min(1e-12) ** (1 - lam) * zs_probs.clamp_min(1e-12) ** lam
    return torch.cat([cls, det_probs[:, c:]], dim=1)


class RegionEnsemble(nn.Module):
    """The frozen region classifier of the ensemble: a CLIP ResNet (C4 path) that stays in
    eval mode and is never trained, and the ensemble's shares.

    Args:
        encoder: a :class:`~regionclip_d2.modeling.backbone.clip_resnet.CLIPResNet` returning res4.
        alpha, beta: the frozen model's share of the base / other classes' scores.
    """

    def __init__(self, encoder: nn.Module, alpha: float = 0.35, beta: float = 0.65):
        super().__init__()
        for name, v in (("MODEL.CLIP.ENSEMBLE_ALPHA", alpha), ("MODEL.CLIP.ENSEMBLE_BETA", beta)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}={v}: the frozen model's share must lie in [0, 1]")
        self.encoder = encoder
        for p in self.encoder.parameters():
            p.requires_grad = False
        self.alpha, self.beta = alpha, beta
        side = int(round(math.sqrt(encoder.attnpool.positional_embedding.shape[0] - 1)))
        # RoIAlign at twice the attention pool's native grid: res5 halves it back (14 -> 7 for RN50)
        self.pooler = thread_roi_align(ROIPooler(output_size=(2 * side, 2 * side), scales=(1.0 / 16,),
                                                 sampling_ratio=0, pooler_type="ROIAlignV2"))
        self.encoder.eval()

    def train(self, mode: bool = True):  # frozen: BatchNorm statistics and all stay as loaded
        super().train(mode)
        self.encoder.eval()
        return self

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    def shares(self, novel: torch.Tensor) -> torch.Tensor:
        """``[C]`` bool (True: a class outside the training vocabulary) -> ``[C]`` lambdas."""
        return torch.where(novel, torch.tensor(self.beta), torch.tensor(self.alpha)).to(novel.device)

    @torch.no_grad()
    def class_probs(self, images: torch.Tensor, boxes: List[Boxes], text: torch.Tensor,
                    temperature: float) -> List[torch.Tensor]:
        """Per image, ``[R_i, C]`` softmax over the classes (``text`` ``[C, D]``) of the cosines
        of the boxes' region embeddings, divided by ``temperature``. ``images``: the detector's
        preprocessed recognition input (CLIP normalisation, padded batch)."""
        res4 = self.encoder(images.to(next(self.encoder.parameters()).dtype))["res4"]
        pooled = self.pooler([res4], boxes)
        emb = self.encoder.encode_pooled_regions(pooled) if len(pooled) else \
            pooled.new_zeros(0, self.embed_dim)
        logits = F.normalize(emb.float(), dim=-1) @ F.normalize(text.float(), dim=-1).t() / temperature
        return list(torch.softmax(logits, dim=-1).split([len(b) for b in boxes]))
