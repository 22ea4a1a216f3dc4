"""The grounding head as the box predictor of the CLIP detectors (C4 and FPN).

``MODEL.GROUNDING.ENABLED`` swaps the open-vocabulary predictor (region embeddings
against class text embeddings) for :class:`GroundingPredictor`: the vocabulary becomes a
prompt ("circle. star. moon."), a region's class scores come from its alignment with the
prompt's tokens (``S = O P^T`` with a learned scale and bias, a class's probability the
mean or max of its tokens' sigmoid probabilities), trained with the sigmoid focal loss
against token-level targets. ``MODEL.GROUNDING.FUSION_LAYERS`` (``L``) layers of
bidirectional cross-attention run between each image's region embeddings and the prompt's
tokens before the alignment (``L = 0``: late fusion).

Why fusion on the region features and not on the feature map (GLIP fuses on its FPN
levels): in these detectors localisation comes from a separate, frozen RPN branch, so
text-conditioned feature maps could not change which regions are proposed; what fusion
can change is how each region is classified, and the regions' pooled embeddings are that
(the same for C4 and FPN, where a feature map is res4 for one and five levels for the
other). It is also far cheaper: ``R x T`` attention for R regions instead of ``HW x T``.

A long vocabulary is split into prompts that fit the text tower's context
(:func:`~regionclip_d2.grounding.prompts.build_class_prompts`), each scored on its own and
merged, at inference; training needs the training vocabulary in one prompt. A caption
(:meth:`GroundingPredictor.set_caption`) replaces the vocabulary at inference: its noun
phrases become the classes.

**Grounding data** (captions whose phrases name boxes): an input that carries
``grounding`` (:class:`~regionclip_d2.grounding.mapper.GroundingDatasetMapper`) brings its
own prompt, its caption with its grounded phrases (:meth:`GroundingPredictor.set_batch_groundings`,
called by the detector for each batch). In training a region matched to a box of phrase
``k`` has phrase ``k``'s tokens as targets (``gt_phrases``), other regions none, and the
caption's withheld words are left out of the loss; at inference class ``k`` is phrase
``k`` of that image. Images without ``grounding`` use the class prompt in the same batch.
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads.fast_rcnn import _log_classification_stats

from ..modeling.roi_heads.ov_predictor import OpenVocabularyPredictor
from .head import DeepFusion, RegionTokenAlignment, class_scores, grounding_focal_loss, token_targets
from .prompts import GroundingPrompt, build_class_prompts, caption_prompt, grounded_prompt, merge_chunk_scores
from .text_features import TokenFeatureEncoder

__all__ = ["GroundingPredictor", "NoTokenEncoderError"]

logger = logging.getLogger(__name__)


class NoTokenEncoderError(RuntimeError):
    pass


def split_regions(x: torch.Tensor, counts: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[R, D]`` regions of several images (``counts`` per image, in order) ->
    (``[N, max_count, D]`` zero-padded, ``[N, max_count]`` True at real regions)."""
    counts = [int(c) for c in counts]
    if sum(counts) != x.shape[0]:
        raise ValueError(f"region counts {counts} sum to {sum(counts)} but there are {x.shape[0]} regions")
    n, m = len(counts), max(counts, default=0)
    out = x.new_zeros(n, m, x.shape[-1])
    mask = torch.zeros(n, m, dtype=torch.bool, device=x.device)
    start = 0
    for i, c in enumerate(counts):
        out[i, :c] = x[start:start + c]
        mask[i, :c] = True
        start += c
    return out, mask


class GroundingPredictor(OpenVocabularyPredictor):
    """Box predictor that scores regions against a prompt's tokens (GLIP's grounding head).

    Inherits the region embedding (``embed``: the C4 attention-pool output, or the FPN box
    head's projection into the text space), the class-agnostic box regression, the
    vocabularies (train / test, set by config or ``set_vocabulary``; only their *names* are
    used) and the post-processing of :class:`OpenVocabularyPredictor`.

    Args (besides the parent's):
        text_dim: width of the token features (the text tower's joint-space width).
        fusion_layers: ``L`` bidirectional cross-attention layers (0 = late fusion).
        align_dim: width of the alignment space and of the fusion attention.
        fusion_heads: attention heads per fusion layer.
        prior_prob: initial token probability (the alignment bias's start).
        reduce: a class's score from its tokens: ``"mean"`` or ``"max"``.
        focal_alpha, token_focal_gamma: the sigmoid focal loss over tokens.
        train_text: the text tower learns (off by default: frozen token features).
        phrase_embeddings: ``"add"``: each phrase's tokens also carry the text tower's embedding
            of the phrase read alone (:meth:`phrase_token_embeddings`); ``"replace"``: they are
            that embedding; ``"none"``: per-token features only (GLIP's).
        align_init: ``"identity"`` starts both alignment projections at the identity (the
            alignment starts as CLIP's cosine; needs ``align_dim`` = both widths).
    """

    @configurable
    def __init__(self, input_shape, *, embed_dim: int, text_dim: int, fusion_layers: int = 0, align_dim: int = 256,
                 fusion_heads: int = 8, prior_prob: float = 0.01, reduce: str = "mean", focal_alpha: float = 0.25,
                 token_focal_gamma: float = 2.0, train_text: bool = False, phrase_embeddings: str = "none",
                 align_init: str = "random", **kwargs):
        super().__init__(input_shape, embed_dim=embed_dim, **kwargs)
        if reduce not in ("mean", "max", "last"):
            raise ValueError(f"MODEL.GROUNDING.REDUCE={reduce!r}: use 'mean', 'max' or 'last'")
        # (``self.fusion`` is the parent's RPN-score fusion mode)
        self.deep_fusion = DeepFusion(embed_dim, text_dim, num_layers=fusion_layers, embed_dim=align_dim,
                                      num_heads=fusion_heads)
        if phrase_embeddings not in ("none", "add", "replace"):
            raise ValueError(f"MODEL.GROUNDING.PHRASE_EMBEDDINGS={phrase_embeddings!r}: use 'none', 'add' or 'replace'")
        self.align = RegionTokenAlignment(embed_dim, text_dim, dim=align_dim, prior_prob=prior_prob, init=align_init)
        self.text_dim = text_dim
        self.reduce = reduce
        self.focal_alpha = focal_alpha
        self.token_focal_gamma = token_focal_gamma
        self.train_text = train_text
        self.phrase_embeddings = phrase_embeddings
        self._phrase_cache: Dict[str, torch.Tensor] = {}
        self.token_encoder: Optional[TokenFeatureEncoder] = None
        self._prompts: Dict[tuple, List[GroundingPrompt]] = {}
        self._grounded: Dict[tuple, GroundingPrompt] = {}  # prompts of grounding data, by caption and spans
        self._batch: Optional[List[Optional[dict]]] = None
        self.caption: Optional[GroundingPrompt] = None

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        g = cfg.MODEL.GROUNDING
        text_dim = g.TEXT_DIM or cfg.MODEL.CLIP.TEXT_EMB_DIM
        ret.update(text_dim=text_dim, fusion_layers=g.FUSION_LAYERS, align_dim=g.ALIGN_DIM or text_dim,
                   fusion_heads=g.FUSION_HEADS, prior_prob=g.PRIOR_PROB, reduce=g.REDUCE,
                   focal_alpha=g.FOCAL_ALPHA, token_focal_gamma=g.FOCAL_GAMMA, train_text=g.TRAIN_TEXT,
                   phrase_embeddings=g.PHRASE_EMBEDDINGS, align_init=g.ALIGN_INIT)
        return ret

    # ---- text side ----
    def set_token_encoder(self, encoder: nn.Module):
        """The text tower whose per-token outputs are the prompt features (the detector's
        ``lang_encoder``; CLIPFastRCNN sets it when it is built). Not a submodule: its weights
        keep the detector's ``lang_encoder.*`` keys."""
        tfe = TokenFeatureEncoder(encoder, trainable=self.train_text)
        if tfe.embed_dim != self.text_dim:
            raise ValueError(f"the text tower's token features have dim {tfe.embed_dim} but the grounding head "
                             f"expects {self.text_dim}: set MODEL.GROUNDING.TEXT_DIM (or MODEL.CLIP.TEXT_EMB_DIM) "
                             "to the CLIP model's embedding width")
        object.__setattr__(self, "token_encoder", tfe)  # plain attribute, not a registered submodule
        self._prompts.clear()
        self._grounded.clear()
        self._phrase_cache.clear()

    def text_encoder_changed(self):
        """New text-tower weights were loaded: cached phrase embeddings are stale."""
        self._phrase_cache.clear()

    def _encoder(self) -> TokenFeatureEncoder:
        if self.token_encoder is None:
            raise NoTokenEncoderError("the grounding head has no text tower: call set_token_encoder(the detector's "
                                      "lang_encoder) (CLIPFastRCNN does this when MODEL.GROUNDING.ENABLED is set)")
        return self.token_encoder

    def set_caption(self, caption: Optional[str], max_phrase_words: Optional[int] = None) -> Optional[List[str]]:
        """Ground a free caption at the next inferences: its noun phrases become the classes
        (class ``i`` = phrase ``i``); ``None`` goes back to the class vocabulary. Returns the
        phrases. Raises ``NoPhraseError`` for an empty caption or one without a noun phrase and
        ``PromptTooLongError`` for one longer than the text tower's context."""
        if caption is None:
            self.caption = None
            return None
        enc = self._encoder()
        self.caption = caption_prompt(caption, enc.encoder.tokenizer, enc.context_length, max_phrase_words)
        return list(self.caption.phrases)

    def prompts(self) -> List[GroundingPrompt]:
        """The prompts of the active vocabulary (or the caption), cached by names."""
        if self.caption is not None and not self.training:
            return [self.caption]
        names = self.cls_score.active().names
        if not names:
            raise ValueError("the grounding head needs class names, but the vocabulary was given as embeddings "
                             "only: set it with names (model.set_vocabulary(['cat', 'dog']), MODEL.CLIP.VOCABULARY) "
                             "or pass names= with the tensor")
        key = tuple(names)
        if key not in self._prompts:
            enc = self._encoder()
            self._prompts[key] = build_class_prompts(names, enc.encoder.tokenizer, enc.context_length)
        return self._prompts[key]

    def set_batch_groundings(self, groundings: Optional[Sequence[Optional[dict]]]):
        """Each image's ``grounding`` (``{"caption", "phrases", "ignore"}``, from
        :class:`~regionclip_d2.grounding.mapper.GroundingDatasetMapper`; ``None`` for an image
        of detection data) for the next forward; ``None`` or all ``None``: the class prompt
        (or the caption of :meth:`set_caption`) for every image. This is state of the model,
        set per call by the detector: threads sharing one model must not run calls with
        grounding inputs at the same time (captions through :meth:`set_caption` likewise)."""
        if groundings is None or all(g is None for g in groundings):
            self._batch = None
            return
        for g in groundings:
            if g is not None and not (isinstance(g, dict) and "caption" in g and "phrases" in g):
                raise ValueError(f"grounding {str(g)[:80]} is not {{'caption', 'phrases'[, 'ignore']}}: build inputs "
                                 "with regionclip_d2.grounding.GroundingDatasetMapper")
        self._batch = list(groundings)

    def grounding_prompt(self, grounding: dict) -> GroundingPrompt:
        """The prompt of one input's ``grounding`` (cached)."""
        phrases = tuple(tuple(tuple(int(v) for v in s) for s in spans) for spans in grounding["phrases"])
        ignore = tuple(tuple(int(v) for v in s) for s in grounding.get("ignore") or ())
        key = (grounding["caption"], phrases, ignore)
        if key not in self._grounded:
            if not phrases:
                raise ValueError(f"caption {grounding['caption'][:80]!r} has no grounded phrase: give each grounding "
                                 "entry at least one annotation with tokens_positive")
            if len(self._grounded) >= 50000:  # bounded: a data set's captions, not every caption ever seen
                self._grounded.clear()
            enc = self._encoder()
            self._grounded[key] = grounded_prompt(key[0], phrases, enc.encoder.tokenizer, enc.context_length,
                                                  ignore)
        return self._grounded[key]

    def image_prompts(self, num_images: int) -> Optional[List[GroundingPrompt]]:
        """One prompt per image when the batch carries grounding data (images without it take
        the class prompt), else ``None``."""
        if self._batch is None:
            return None
        if len(self._batch) != num_images:
            raise ValueError(f"{len(self._batch)} groundings for {num_images} images: call set_batch_groundings with "
                             "one entry (or None) per image of the batch")
        out, class_prompt = [], None
        for g in self._batch:
            if g is not None:
                out.append(self.grounding_prompt(g))
                continue
            if class_prompt is None:
                prompts = self.prompts()
                if len(prompts) != 1:
                    raise ValueError(f"a batch mixing captions and class prompts needs the vocabulary in one prompt, "
                                     f"but it takes {len(prompts)}: use fewer or shorter class names")
                class_prompt = prompts[0]
            out.append(class_prompt)
        return out

    @property
    def class_names(self) -> Optional[List[str]]:
        if self.caption is not None and not self.training:
            return list(self.caption.phrases)
        return super().class_names

    @property
    def num_classes(self) -> int:
        """Classes of the active vocabulary, or phrases of the caption; with grounding data,
        the most phrases an image of the batch has (class ``k`` = phrase ``k``)."""
        if self._batch is not None:
            return max(len(p) for p in self.image_prompts(len(self._batch)))
        if self.caption is not None and not self.training:
            return len(self.caption)
        return self.cls_score.num_classes()

    @num_classes.setter
    def num_classes(self, value):
        pass

    # ---- forward ----
    def token_logits(self, emb: torch.Tensor, counts: Sequence[int], prompt) -> torch.Tensor:
        """``[R, D]`` region embeddings of images holding ``counts`` regions each -> ``[R, T]``
        token logits against ``prompt`` (one :class:`GroundingPrompt` for all images, or a
        list with one per image), after the fusion layers, per image."""
        prompts = [prompt] if isinstance(prompt, GroundingPrompt) else list(prompt)
        v, vmask = split_regions(emb, counts)
        n = v.shape[0]
        if len(prompts) not in (1, n):
            raise ValueError(f"{len(prompts)} prompts for {n} images: give one prompt, or one per image")
        feats = self._encoder().encode_prompts(prompts)
        tokens, mask = feats["tokens"].to(emb.device, emb.dtype), feats["mask"].to(emb.device)
        if self.phrase_embeddings != "none":
            phr = self.phrase_token_embeddings(prompts).to(emb.device, emb.dtype)
            if self.phrase_embeddings == "add":
                tokens = tokens + phr
            else:  # replace: a phrase's tokens are its own embedding
                tokens = torch.where(phr.abs().sum(dim=-1, keepdim=True) > 0, phr, tokens)
        t = tokens.expand(n, -1, -1)
        tm = mask.expand(n, -1)
        v, t = self.deep_fusion(v, t, tm, vmask)
        logits = self.align(v, t, tm)  # [N, max_count, T]
        return logits[vmask]

    def phrase_token_embeddings(self, prompts: Sequence[GroundingPrompt]) -> torch.Tensor:
        """``[P, T, D]``: at each phrase's tokens, the text tower's embedding of the phrase read
        alone (its end-of-text output: the one CLIP aligns with images); zero elsewhere. With
        a frozen text tower the phrases' embeddings are cached (until new text-tower weights
        arrive: :meth:`text_encoder_changed`)."""
        enc = self._encoder()
        texts = sorted({ph for p in prompts for ph in p.phrases})
        missing = [t for t in texts if t not in self._phrase_cache] if not self.train_text else texts
        fresh = {}
        if missing:
            ids = enc.encoder.tokenizer(missing)[:, :enc.context_length]
            eot = enc(ids)["eot"]
            fresh = dict(zip(missing, eot))
            if not self.train_text and not torch.is_inference_mode_enabled():  # (inference tensors stay out)
                if len(self._phrase_cache) >= 50000:
                    self._phrase_cache.clear()
                self._phrase_cache.update({t: e.detach() for t, e in fresh.items()})
        out = []
        for p in prompts:
            pm = p.positive_map().to(enc.encoder.text_projection.device)
            e = torch.stack([fresh.get(ph, self._phrase_cache.get(ph)) for ph in p.phrases])  # [C, D]
            out.append(pm.t() @ e.to(pm.dtype) / pm.sum(dim=0).clamp(min=1)[:, None])  # a token in two phrases: mean
        return torch.stack(out)

    def forward(self, x: torch.Tensor, counts: Optional[Sequence[int]] = None):
        """``[R, ...]`` region features (``counts`` per image; default: one image) ->
        (training: ``[R, T]`` token logits of the one training prompt; inference: ``[R, C]``
        class probabilities over the active vocabulary or the caption's phrases) and
        ``[R, 4]`` deltas."""
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        counts = [x.shape[0]] if counts is None else list(counts)
        deltas = self.bbox_pred(x).float()
        emb = self.embed(x)
        per_image = self.image_prompts(len(counts))
        if per_image is not None:
            logits = self.token_logits(emb, counts, per_image)
            if self.training:
                return logits, deltas
            # class k of an image = phrase k of its own prompt; columns past its phrases are 0
            probs = logits.new_zeros(logits.shape[0], max(len(p) for p in per_image), dtype=torch.float32)
            start = 0
            for p, c in zip(per_image, counts):
                probs[start:start + c, :len(p)] = class_scores(logits[start:start + c].float(),
                                                               p.positive_map().to(emb.device), self.reduce)
                start += c
            return probs, deltas
        prompts = self.prompts()
        if self.training:
            if len(prompts) != 1:
                raise ValueError(f"the training vocabulary needs {len(prompts)} prompts but training takes one: use "
                                 "fewer or shorter class names, or a text tower with a longer context")
            return self.token_logits(emb, counts, prompts[0]), deltas
        chunk = []
        for p in prompts:
            pm = p.positive_map().to(emb.device)
            chunk.append(class_scores(self.token_logits(emb, counts, p).float(), pm, self.reduce))
        probs = chunk[0] if len(prompts) == 1 and self.caption is not None else \
            merge_chunk_scores(chunk, prompts, num_classes=self.num_classes, fill=0.0)
        return probs, deltas

    # ---- training ----
    def losses(self, predictions, proposals):
        logits, deltas = predictions
        per_image = self.image_prompts(len(proposals))
        if per_image is None:
            targets, mask = self._class_prompt_targets(logits, proposals)
        else:
            targets, mask = self._grounding_targets(logits, proposals, per_image)
        if len(proposals):
            gt_classes = cat([p.gt_classes for p in proposals], dim=0)
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            gt_boxes = cat([(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals], dim=0)
        else:
            gt_classes = torch.empty(0, dtype=torch.long, device=logits.device)
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=deltas.device)
        if per_image is not None:  # box regression (class-agnostic): a region with a target phrase is foreground
            gt_classes = torch.where(targets.any(dim=1), torch.zeros_like(gt_classes), torch.full_like(gt_classes, -1))
        return {
            "loss_grounding": grounding_focal_loss(logits, targets, mask, self.focal_alpha, self.token_focal_gamma),
            "loss_box_reg": self.box_reg_loss(proposal_boxes, gt_boxes, deltas, gt_classes),
        }

    def _class_prompt_targets(self, logits, proposals):
        """Token targets and mask of detection data against the one class prompt."""
        prompt = self.prompts()[0]
        gt_classes = cat([p.gt_classes for p in proposals], dim=0) if len(proposals) else \
            torch.empty(0, dtype=torch.long, device=logits.device)
        num_classes = self.num_classes
        # the prompt's phrases are the classes in its label order (one prompt: 0..C-1)
        labels = torch.tensor(prompt.labels, device=logits.device)
        pm = torch.zeros(num_classes, logits.shape[-1], device=logits.device)
        pm[labels] = prompt.positive_map().to(logits.device)
        with torch.no_grad():  # accuracy stats as detectron2 logs them: background wins below probability 0.5
            full = logits.new_zeros(logits.shape[0], num_classes + 1, dtype=torch.float32)
            full[:, labels] = class_scores(logits.detach().float(), pm[labels], self.reduce)
            full[:, num_classes] = 0.5
            _log_classification_stats(full, gt_classes)
        mask = self._encoder().encode_prompts([prompt])["mask"][0].to(logits.device)
        return token_targets(gt_classes, pm), mask

    def _grounding_targets(self, logits, proposals, prompts):
        """Per-image token targets and ``[R, T]`` mask: a region matched to a box of phrase
        ``k`` (``gt_phrases``; grounding data marks its boxes ``gt_classes`` 0, background
        is any other class) targets phrase ``k``'s tokens; images without grounding data
        target their class's tokens in the class prompt. Padding and withheld words are
        masked out."""
        feats = self._encoder().encode_prompts(prompts)
        token_mask = feats["mask"].to(logits.device)
        targets, masks = [], []
        for i, (p, prompt) in enumerate(zip(proposals, prompts)):
            pm = prompt.positive_map().to(logits.device)
            g = self._batch[i]
            if g is None:  # detection data: class k is phrase k of the class prompt
                labels = p.gt_classes
            elif p.has("gt_phrases"):
                labels = torch.where(p.gt_classes == 0, p.gt_phrases, torch.full_like(p.gt_phrases, -1))
            else:  # an image without boxes: every region is background
                labels = torch.full((len(p),), -1, dtype=torch.long, device=logits.device)
            targets.append(token_targets(labels, pm))
            m = token_mask[i].clone()
            if prompt.ignore_positions:
                m[torch.tensor(prompt.ignore_positions, device=m.device)] = False
            masks.append(m.expand(len(p), -1))
        if not targets:
            return logits.new_zeros(logits.shape), torch.zeros_like(logits, dtype=torch.bool)
        return cat(targets, dim=0), cat(masks, dim=0)

    # ---- inference ----
    def predict_probs(self, predictions, proposals):
        probs, _ = predictions
        probs = torch.cat([probs, probs.new_zeros(probs.shape[0], 1)], dim=1)  # a background column, dropped later
        if self.fusion != "none" and len(proposals) and proposals[0].has("objectness_logits"):
            obj = cat([p.objectness_logits for p in proposals]).float()[:, None]
            probs = torch.sqrt(torch.sigmoid(obj) * probs) if self.fusion == "geometric" else \
                torch.sqrt(obj * probs)
        return probs.split([len(p) for p in proposals], dim=0)
