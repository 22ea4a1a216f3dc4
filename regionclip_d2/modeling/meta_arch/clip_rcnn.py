"""CLIPFastRCNN: the open-vocabulary detector of RegionCLIP.

image -> regions (the frozen RPN branch, GT boxes or given proposals) -> RoI features
(CLIP backbone: res4, RoIAlign, res5, attention pool) -> scores against the vocabulary's
text embeddings -> fused scores -> Instances.
"""
import contextlib
import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes, ImageList, Instances

from ...checkpoint.loading import check_weights_file, load_clip_weights, load_rpn_weights
from ...config import check_config
from ...data.vocabularies import load_vocabulary
from ..backbone.clip_resnet import clip_resnet_from_cfg
from ..ensemble import RegionEnsemble
from ..text import build_language_encoder, embed_class_names, load_text_embeddings
from .two_branch import TwoBranchModel, build_offline_rpn_cfg, rpn_branch_from_config

logger = logging.getLogger(__name__)

__all__ = ["CLIPFastRCNN", "load_from_cfg", "build_offline_rpn_cfg"]

REGION_TYPES = ("RPN", "GT", "PROPOSALS")


@META_ARCH_REGISTRY.register()
class CLIPFastRCNN(TwoBranchModel):
    """Two branches: localization (a frozen detectron2 backbone + RPN, its own input
    format and normalisation) and recognition (a CLIP ResNet + CLIP RoI head).

    Regions come from ``region_type``: ``RPN`` (the RPN branch), ``GT`` (the boxes of
    each input's ``instances``) or ``PROPOSALS`` (each input's ``proposals``).

    The vocabularies (training and test) are the box predictor's (``roi_heads.box_predictor
    .cls_score``, see ``roi_heads/vocabulary.py``); this model embeds those given as names with
    its language encoder (:meth:`prepare_vocabulary`), on first use and after new text-encoder
    weights are loaded.
    """

    @configurable
    def __init__(self, *, backbone, roi_heads, lang_encoder=None, offline_backbone=None,
                 offline_proposal_generator=None, region_type: str = "RPN",
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], input_format: str = "RGB",
                 offline_pixel_mean: Sequence[float] = (103.53, 116.28, 123.675),
                 offline_pixel_std: Sequence[float] = (1.0, 1.0, 1.0), offline_input_format: str = "BGR",
                 train_offline_rpn: bool = False, prompt_templates: str = "imagenet80",
                 inference_dtype: str = "float32", channels_last: bool = False,
                 train_vocabulary: Union[torch.Tensor, Sequence[str], None] = None,
                 test_vocabulary: Union[torch.Tensor, Sequence[str], None] = None,
                 lang_encoder_loaded: bool = False, rpn_weights_file: str = "", fold_batchnorm: bool = True,
                 ensemble: Optional[RegionEnsemble] = None):
        super().__init__()
        self.__dict__["fold_batchnorm"] = fold_batchnorm
        if region_type not in REGION_TYPES:
            raise ValueError(f"MODEL.CLIP.CROP_REGION_TYPE={region_type!r}: use one of {REGION_TYPES}")
        if region_type == "RPN" and (offline_backbone is None or offline_proposal_generator is None):
            raise ValueError("region type RPN needs the RPN branch (MODEL.CLIP.OFFLINE_RPN_CONFIG)")
        self.backbone = backbone
        self.roi_heads = roi_heads
        self.lang_encoder = lang_encoder
        self.ensemble = ensemble  # the frozen region classifier of the score ensemble (MODEL.CLIP.ENSEMBLE_WEIGHTS)
        self.region_type = region_type
        self.prompt_templates = prompt_templates
        if inference_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"MODEL.CLIP.INFERENCE_DTYPE={inference_dtype!r}: use float32 or bfloat16")
        self.inference_dtype = inference_dtype
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.lang_encoder_loaded = lang_encoder_loaded  # becomes True when text-encoder weights arrive
        self._init_two_branch(pixel_mean=pixel_mean, pixel_std=pixel_std, input_format=input_format,
                              offline_backbone=offline_backbone,
                              offline_proposal_generator=offline_proposal_generator,
                              offline_pixel_mean=offline_pixel_mean, offline_pixel_std=offline_pixel_std,
                              offline_input_format=offline_input_format, train_offline_rpn=train_offline_rpn,
                              rpn_weights_file=rpn_weights_file)
        if hasattr(self.roi_heads, "set_region_encoder"):  # C4: res5 + attention pool are the backbone's
            self.roi_heads.set_region_encoder(self.encode_pooled_regions)
        if hasattr(self.roi_heads.box_predictor, "set_token_encoder"):  # grounding: prompt tokens from the text tower
            if lang_encoder is None:
                raise ValueError("MODEL.GROUNDING.ENABLED needs the CLIP text tower: set MODEL.CLIP.OPENCLIP_MODEL "
                                 "(or OPENCLIP_MODEL_CONFIG) so the detector builds its language encoder")
            self.roi_heads.box_predictor.set_token_encoder(lang_encoder)
        self.register_load_state_dict_post_hook(_text_encoder_loaded)
        for train, vocab in ((True, train_vocabulary), (False, test_vocabulary)):
            if torch.is_tensor(vocab):
                self.set_vocabulary(vocab, train=train)
            elif vocab is not None:  # names: embedded on first use, after any weights are loaded
                self._vocabulary(train).request(load_vocabulary(vocab))

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.CLIP
        check_config(cfg)
        backbone = build_backbone(cfg)
        ret = {
            "backbone": backbone,
            "roi_heads": build_roi_heads(cfg, backbone.output_shape()),
            "lang_encoder": build_language_encoder(c.OPENCLIP_MODEL, c.OPENCLIP_MODEL_CONFIG),
            "region_type": c.CROP_REGION_TYPE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "train_offline_rpn": c.TRAIN_OFFLINE_RPN,
            "prompt_templates": c.PROMPT_TEMPLATES,
            "inference_dtype": c.INFERENCE_DTYPE,
            "channels_last": c.CHANNELS_LAST,
            "fold_batchnorm": c.FOLD_BATCHNORM,
        }
        if c.ENSEMBLE_WEIGHTS:
            ret["ensemble"] = RegionEnsemble(clip_resnet_from_cfg(cfg, ["res4"], freeze_at=5),
                                             alpha=c.ENSEMBLE_ALPHA, beta=c.ENSEMBLE_BETA)
        ret.update(rpn_branch_from_config(cfg))
        ret.update(load_from_cfg(cfg, ret))
        return ret

    # ------------------------------------------------------------------ helpers
    @property
    def clip_resnet(self):
        """The CLIP ResNet (``backbone`` in C4, ``backbone.bottom_up`` in FPN)."""
        return getattr(self.backbone, "bottom_up", self.backbone)

    def encode_pooled_regions(self, pooled: torch.Tensor) -> torch.Tensor:
        """C4 region encoder (res5 + attention pool of the CLIP ResNet, folded while folding)."""
        resnet = self.inference_module("backbone")
        return getattr(resnet, "bottom_up", resnet).encode_pooled_regions(pooled)

    @property
    def embed_dim(self) -> int:
        return self.clip_resnet.embed_dim

    def frozen_modules(self) -> List[nn.Module]:
        return super().frozen_modules() + ([self.lang_encoder] if self.lang_encoder is not None else [])

    # ------------------------------------------------------------------ vocabulary
    def _vocabulary(self, train: bool):
        pred = self.roi_heads.box_predictor
        return pred.train_vocabulary if train else pred.test_vocabulary

    @property
    def class_names(self) -> Optional[List[str]]:
        """Names of the vocabulary the next call uses (None for a bare tensor vocabulary)."""
        return self.roi_heads.box_predictor.class_names

    def prepare_vocabulary(self):
        """Embed the vocabularies given as names that are not embedded with the current
        text encoder (the model's calls do this themselves; trainers call it before
        wrapping the model)."""
        for train in (True, False):
            self._vocabulary(train).refresh(lambda names: self.embed_vocabulary(names)[0])

    def embed_vocabulary(self, vocabulary) -> Tuple[torch.Tensor, List[str]]:
        """Names (list, builtin name, file or 'a,b,c') -> (``[C, D]`` embeddings, names)."""
        if self.lang_encoder is None:
            raise RuntimeError("this model has no language encoder: pass a [C, D] tensor instead of names")
        names = load_vocabulary(vocabulary)
        if not self.lang_encoder_loaded:
            logger.warning("embedding %d class names with a text encoder that has RANDOM weights: the "
                           "vocabulary is meaningless. Set MODEL.CLIP.CLIP_WEIGHTS to the CLIP file "
                           "(e.g. OpenAI RN50.pt), use a checkpoint holding lang_encoder.*, or give "
                           "MODEL.CLIP.TEXT_EMB_PATH", len(names))
        emb = embed_class_names(names, self.lang_encoder, templates=self.prompt_templates)
        return emb, names

    def set_vocabulary(self, vocabulary: Union[Sequence[str], str, torch.Tensor],
                       names: Optional[Sequence[str]] = None, train: bool = False,
                       logit_affine: Optional[torch.Tensor] = None):
        """Set the vocabulary used by the next inference (or training, with ``train=True``).

        ``vocabulary``: class names (a list, a builtin name such as ``coco`` / ``lvis``, a
        .txt/.json file, or ``"a,b,c"``), embedded with the model's language encoder
        (cached on disk) and embedded again if new text-encoder weights are loaded later, or
        a ``[C, D]`` tensor of text embeddings (then ``names`` is optional). ``logit_affine``
        (tensor vocabularies only): ``[C, 2]`` per-class (scale, bias) applied to the cosines
        before the temperature, e.g. for classes given by image exemplars
        (``Detector.calibrate_exemplars``).

        Thread safety: the embeddings and names are replaced together, under a lock. Calls
        of the model running in other threads meanwhile each use either the old or the new
        vocabulary, entirely, but which one is not defined (nor which one ``class_names``
        names): change the vocabulary while no prediction is in flight.
        """
        if torch.is_tensor(vocabulary):
            self._vocabulary(train).set(vocabulary, names, source="tensor", logit_affine=logit_affine)
            return names
        if logit_affine is not None:
            raise ValueError("logit_affine needs a [C, D] tensor vocabulary (names are embedded later)")
        emb, names = self.embed_vocabulary(vocabulary)
        self._vocabulary(train).set(emb, names, source="names")
        return names

    # ------------------------------------------------------------------ regions
    def get_regions(self, batched_inputs) -> List[Instances]:
        """The regions the detector classifies, per input (``proposal_boxes``; with the RPN
        also ``objectness_logits``)."""
        return self._regions(batched_inputs)[0]

    def _regions(self, batched_inputs, gt_instances=None) -> Tuple[List[Instances], Dict[str, torch.Tensor]]:
        """Regions per input, and the RPN branch's losses (when it is trained)."""
        if self.region_type == "GT":
            regions = []
            for x in batched_inputs:
                if "instances" not in x:
                    raise ValueError("MODEL.CLIP.CROP_REGION_TYPE is 'GT' but an input has no 'instances': "
                                     "give ground-truth boxes (instances.gt_boxes) or use the RPN")
                inst = x["instances"].to(self.device)
                r = Instances(inst.image_size)
                r.proposal_boxes = inst.gt_boxes.clone()
                regions.append(r)
            return regions, {}
        if self.region_type == "PROPOSALS":
            regions = []
            for x in batched_inputs:
                if "proposals" not in x:
                    raise ValueError("MODEL.CLIP.CROP_REGION_TYPE is 'PROPOSALS' but an input has no 'proposals'")
                regions.append(x["proposals"].to(self.device))
            return regions, {}
        return self.propose(batched_inputs, gt_instances)

    def encode_boxes(self, batched_inputs: List[Dict], boxes: Sequence) -> List[torch.Tensor]:
        """Embeddings of given boxes, computed as the detector computes region embeddings
        (C4: res4 RoIAlign, res5, attention pool; FPN: box head and projection).

        Args:
            batched_inputs: inputs as for ``forward`` (``image`` ``[3, H, W]`` in the model's
                input format, already resized).
            boxes: per input, a ``Boxes`` or ``[R_i, 4]`` XYXY tensor in the input image's pixels.
        Returns:
            per input, ``[R_i, D]`` L2-normalised embeddings in the text space (compare them
            with text embeddings by a dot product).
        """
        if len(boxes) != len(batched_inputs):
            raise ValueError(f"{len(boxes)} box sets for {len(batched_inputs)} images: give one per image")
        boxes = [b if isinstance(b, Boxes) else Boxes(torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4))
                 for b in boxes]
        boxes = [b.to(self.device) for b in boxes]
        with torch.no_grad():
            images = self.preprocess_image(batched_inputs)
            features = self.backbone(images.tensor)
            emb = self.roi_heads.encode_boxes(features, boxes)
        return list(torch.nn.functional.normalize(emb.float(), dim=-1).split([len(b) for b in boxes]))

    # ------------------------------------------------------------------ forward
    def set_batch_groundings(self, groundings: Optional[Sequence[Optional[dict]]]):
        """Hand the batch's ``grounding`` entries (grounding data, one per image or ``None``)
        to the grounding head; a detector without one refuses them in training (its
        classifier cannot learn from phrases)."""
        pred = self.roi_heads.box_predictor
        if hasattr(pred, "set_batch_groundings"):
            pred.set_batch_groundings(groundings)
        elif self.training and groundings is not None and any(g is not None for g in groundings):
            raise ValueError("these training images are grounding data (captions whose phrases name the boxes), "
                             "which trains the grounding head only: set MODEL.GROUNDING.ENABLED True, or train on "
                             "detection data")

    def forward(self, batched_inputs: List[Dict]):
        self.prepare_vocabulary()
        if not self.training:
            return self.inference(batched_inputs)
        self.set_batch_groundings([x.get("grounding") for x in batched_inputs])
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs] \
            if "instances" in batched_inputs[0] else None
        regions, losses = self._regions(batched_inputs, gt_instances)
        if self.region_type == "GT":
            for r in regions:
                r.objectness_logits = torch.ones(len(r), device=self.device)
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        _, detector_losses = self.roi_heads(images, features, regions, gt_instances)
        losses.update(detector_losses)
        return losses

    def inference(self, batched_inputs: List[Dict], do_postprocess: bool = True):
        """Detections for each input (``instances`` in the input's height/width).
        Runs under ``torch.inference_mode``; with ``INFERENCE_DTYPE bfloat16`` the
        networks run under autocast (scores and boxes come back as float32)."""
        assert not self.training
        self.prepare_vocabulary()  # outside inference mode: the embeddings may serve training later
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) \
            if self.inference_dtype == "bfloat16" else contextlib.nullcontext()
        if self.fold_batchnorm:
            self.folded_modules()  # made outside inference mode (their tensors are ordinary ones)
        self.set_folding(self.fold_batchnorm)
        try:
            with torch.inference_mode(), autocast:
                return self._inference(batched_inputs, do_postprocess)
        finally:
            self.set_folding(False)

    def _phrase_classifier(self, images, features, regions, groundings):
        """Grounding by the text-embedding classifier alone (the baseline of a grounding
        head): each image's phrases, embedded like class names (the prompt templates), are
        its vocabulary; class ``k`` is phrase ``k``. Images without ``grounding`` use the
        test vocabulary."""
        if self.lang_encoder is None:
            raise ValueError("grounding captions with the text-embedding classifier needs the CLIP text tower to embed "
                             "their phrases: set MODEL.CLIP.OPENCLIP_MODEL (or OPENCLIP_MODEL_CONFIG)")
        outs = []
        vocab = self._vocabulary(False)
        for i, g in enumerate(groundings):
            sub = ImageList(images.tensor[i:i + 1], [images.image_sizes[i]])
            feats = {k: v[i:i + 1] for k, v in features.items()}
            if g is None:
                outs += self.roi_heads(sub, feats, [regions[i]], None)[0]
                continue
            texts = phrase_texts(g)
            distinct = list(dict.fromkeys(texts))
            emb = embed_class_names(distinct, self.lang_encoder, templates=self.prompt_templates, use_cache=False)
            with vocab.replaced(emb[[distinct.index(t) for t in texts]], texts):
                outs += self.roi_heads(sub, feats, [regions[i]], None)[0]
        return outs

    def novel_classes(self) -> torch.Tensor:
        """``[C]`` bool over the active (test) vocabulary: True for a class outside the training
        vocabulary (by name where both have names, else by embedding); all False when the
        training vocabulary is the one in use."""
        pred = self.roi_heads.box_predictor
        test, train = self._vocabulary(False), self._vocabulary(True)
        n = pred.cls_score.num_classes()
        if pred.cls_score.active() is train or len(train) == 0:
            return torch.zeros(n, dtype=torch.bool, device=self.device)
        if test.names is not None and train.names is not None:
            known = set(train.names)
            return torch.tensor([name not in known for name in test.names], dtype=torch.bool, device=self.device)
        a = torch.nn.functional.normalize(test.embeddings.float(), dim=-1)
        b = torch.nn.functional.normalize(train.embeddings.float(), dim=-1)
        return (a @ b.t()).max(dim=1).values < 1 - 1e-5

    def _attach_ensemble(self, images: ImageList, regions: List[Instances]):
        """The frozen model's class probabilities on every region (``ensemble_probs`` ``[R, C]``)
        and its shares (``ensemble_shares``), for the box predictor to combine with its own."""
        pred = self.roi_heads.box_predictor
        text = pred.cls_score.embeddings()
        probs = self.ensemble.class_probs(images.tensor, [r.proposal_boxes for r in regions], text,
                                          pred.cls_score.temperature)
        shares = self.ensemble.shares(self.novel_classes())
        for r, p in zip(regions, probs):
            r.ensemble_probs = p
            r.ensemble_shares = shares.expand(len(r), -1)

    def _inference(self, batched_inputs, do_postprocess):
        regions = self.get_regions(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        if self.ensemble is not None and not any(x.get("grounding") is not None for x in batched_inputs):
            self._attach_ensemble(images, regions)
        results = [None] * len(batched_inputs)
        nonempty = [i for i, r in enumerate(regions) if len(r) > 0]
        if nonempty:
            features = self.inference_module("backbone")(images.tensor)
            if len(nonempty) < len(regions):
                features = {k: v[nonempty] for k, v in features.items()}
                sub_images = ImageList(images.tensor[nonempty], [images.image_sizes[i] for i in nonempty])
            else:
                sub_images = images
            groundings = [batched_inputs[i].get("grounding") for i in nonempty]
            if any(g is not None for g in groundings) and \
                    not hasattr(self.roi_heads.box_predictor, "set_batch_groundings"):
                outs = self._phrase_classifier(sub_images, features, [regions[i] for i in nonempty], groundings)
            else:
                self.set_batch_groundings(groundings)
                try:
                    outs, _ = self.roi_heads(sub_images, features, [regions[i] for i in nonempty], None)
                finally:
                    self.set_batch_groundings(None)
            for i, o in zip(nonempty, outs):
                results[i] = o
        for i, r in enumerate(regions):
            if results[i] is None:  # no region in this image: no detection
                empty = Instances(images.image_sizes[i])
                empty.pred_boxes = Boxes(torch.zeros(0, 4, device=self.device))
                empty.scores = torch.zeros(0, device=self.device)
                empty.pred_classes = torch.zeros(0, dtype=torch.long, device=self.device)
                results[i] = empty
        if not do_postprocess:
            return results
        out = []
        for res, x, size in zip(results, batched_inputs, images.image_sizes):
            h = x.get("height", size[0])
            w = x.get("width", size[1])
            out.append({"instances": detector_postprocess(res, h, w)})
        return out


def phrase_texts(grounding: dict) -> List[str]:
    """The text of each grounded phrase of a ``grounding`` entry (its spans joined by a space)."""
    cap = grounding["caption"]
    return [" ".join(cap[int(a):int(b)] for a, b in spans) for spans in grounding["phrases"]]


def _text_encoder_loaded(model, incompatible_keys):
    """Post-load hook: new language-encoder weights arrived, so vocabularies given as names
    are embedded again (by the next call or :meth:`CLIPFastRCNN.prepare_vocabulary`)."""
    if model.lang_encoder is None or any(k.startswith("lang_encoder.") for k in incompatible_keys.missing_keys):
        return
    model.lang_encoder_loaded = True
    for train in (True, False):
        model._vocabulary(train).text_encoder_changed()
    if hasattr(model.roi_heads.box_predictor, "text_encoder_changed"):  # the grounding head's phrase embeddings
        model.roi_heads.box_predictor.text_encoder_changed()


class _Parts(nn.Module):
    """The detector's submodules under the detector's attribute names, before the detector
    exists: its state-dict keys are the detector's, so files are checked and loaded as if
    into the detector."""

    def __init__(self, parts: Dict):
        super().__init__()
        for name in ("backbone", "roi_heads", "lang_encoder", "offline_backbone", "offline_proposal_generator",
                     "ensemble"):
            setattr(self, name, parts.get(name))


def load_from_cfg(cfg, parts: Dict) -> Dict:
    """Load what the config names into the built submodules ``parts`` (``from_config``'s
    arguments), so that every way of building the model (``build_model``, ``DefaultPredictor``,
    ``train_net.py``) gets it: CLIP_WEIGHTS (backbone + language encoder), BB_RPN_WEIGHTS (the
    RPN branch), and checks of MODEL.WEIGHTS (loaded later by a checkpointer). Returns the
    constructor arguments that carry what was read: the vocabularies (TEXT_EMB_PATH /
    VOCABULARY, OPENSET_TEST_*; NUM_CLASSES checked), ``lang_encoder_loaded`` and
    ``rpn_weights_file``."""
    c = cfg.MODEL.CLIP
    trusted = c.TRUST_CHECKPOINTS
    model = _Parts(parts)
    clip_resnet = getattr(model.backbone, "bottom_up", model.backbone)
    embed_dim = clip_resnet.embed_dim
    out = {}
    if c.CLIP_WEIGHTS:
        load_clip_weights(c.CLIP_WEIGHTS, backbone=clip_resnet, lang_encoder=model.lang_encoder, trusted=trusted)
        out["lang_encoder_loaded"] = True
        logger.info("loaded CLIP weights from %s", c.CLIP_WEIGHTS)
    if model.ensemble is not None:
        if model.ensemble.embed_dim != c.TEXT_EMB_DIM:
            raise ValueError(f"the ensemble's frozen model (MODEL.CLIP.ENSEMBLE_WEIGHTS) produces "
                             f"{model.ensemble.embed_dim}-d region embeddings but the text embeddings have dim "
                             f"{c.TEXT_EMB_DIM}: use a model of the same CLIP as the detector")
        load_clip_weights(c.ENSEMBLE_WEIGHTS, backbone=model.ensemble.encoder, trusted=trusted)
        logger.info("loaded the ensemble's frozen region classifier from %s", c.ENSEMBLE_WEIGHTS)
    if c.BB_RPN_WEIGHTS:
        if model.offline_backbone is None:
            logger.warning("MODEL.CLIP.BB_RPN_WEIGHTS is set but CROP_REGION_TYPE=%s has no RPN branch; "
                           "ignoring it", c.CROP_REGION_TYPE)
        else:
            load_rpn_weights(c.BB_RPN_WEIGHTS, model, trusted=trusted)
            out["rpn_weights_file"] = c.BB_RPN_WEIGHTS
            logger.info("loaded the RPN branch from %s", c.BB_RPN_WEIGHTS)
    # the checks of RegionCLIPCheckpointer for the file DefaultPredictor will load with detectron2's
    check_weights_file(cfg.MODEL.WEIGHTS, model, trusted=trusted, has_clip_weights=bool(c.CLIP_WEIGHTS))
    if embed_dim != c.TEXT_EMB_DIM:
        raise ValueError(f"MODEL.CLIP.TEXT_EMB_DIM={c.TEXT_EMB_DIM} but {c.OPENCLIP_MODEL or c.OPENCLIP_MODEL_CONFIG} "
                         f"produces {embed_dim}-d region embeddings: set MODEL.CLIP.TEXT_EMB_DIM {embed_dim}")
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for split, path, vocab, key, n_key, n_expected in (
        ("train", c.TEXT_EMB_PATH, c.VOCABULARY, "MODEL.CLIP.TEXT_EMB_PATH", "MODEL.ROI_HEADS.NUM_CLASSES",
         num_classes),
        ("test", c.OPENSET_TEST_TEXT_EMB_PATH, c.OPENSET_TEST_VOCABULARY, "MODEL.CLIP.OPENSET_TEST_TEXT_EMB_PATH",
         "MODEL.CLIP.OPENSET_TEST_NUM_CLASSES", c.OPENSET_TEST_NUM_CLASSES),
    ):
        if path and vocab:
            raise ValueError(f"both {key} and a vocabulary of names are set for the {split} vocabulary: keep one")
        if path:
            value = load_text_embeddings(path, embed_dim, key, trusted=trusted)
            n = value.shape[0]
        elif vocab:
            value = load_vocabulary(vocab)
            n = len(value)
        else:
            continue
        if n_expected and n != n_expected:
            raise ValueError(f"the {split} vocabulary has {n} classes but {n_key}={n_expected}: set {n_key} {n}")
        if split == "train" and not n_expected:
            raise ValueError(f"set {n_key} {n} to match the training vocabulary")
        out[f"{split}_vocabulary"] = value
    return out
