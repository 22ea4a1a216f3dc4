"""CLIPFastRCNN: the open-vocabulary detector of RegionCLIP.

image -> regions (the frozen RPN branch, GT boxes or given proposals) -> RoI features
(CLIP backbone: res4, RoIAlign, res5, attention pool) -> scores against the vocabulary's
text embeddings -> fused scores -> Instances.
"""
import contextlib
import logging
import threading
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from detectron2.config import configurable, get_cfg
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_proposal_generator
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes, ImageList, Instances

from ...checkpoint.loading import check_weights_file, install_load_hook, load_clip_weights, load_rpn_weights
from ...config import check_config
from ...data.vocabularies import load_vocabulary
from ..text import build_language_encoder, embed_class_names, load_text_embeddings

logger = logging.getLogger(__name__)

REGION_TYPES = ("RPN", "GT", "PROPOSALS")

# Serialises vocabulary changes (the lazy embedding of names on the first call, and
# set_vocabulary) so that threads sharing a model embed a vocabulary once and always see
# embeddings and names that belong together. One lock for all models: a lock attribute
# would make the module impossible to deepcopy or pickle, and vocabulary changes are rare.
_VOCABULARY_LOCK = threading.RLock()


def build_offline_rpn_cfg(cfg):
    """The detectron2 config of the separate RPN branch, with the overrides of MODEL.CLIP."""
    if not cfg.MODEL.CLIP.OFFLINE_RPN_CONFIG:
        raise ValueError("MODEL.CLIP.CROP_REGION_TYPE is 'RPN' but MODEL.CLIP.OFFLINE_RPN_CONFIG is empty: "
                         "give the yaml of the RPN branch, or set CROP_REGION_TYPE to 'GT'")
    from ... import resolve_config_path

    ocfg = get_cfg()
    ocfg.set_new_allowed(True)
    ocfg.merge_from_file(resolve_config_path(cfg.MODEL.CLIP.OFFLINE_RPN_CONFIG))
    if cfg.MODEL.CLIP.OFFLINE_RPN_NMS_THRESH:
        ocfg.MODEL.RPN.NMS_THRESH = cfg.MODEL.CLIP.OFFLINE_RPN_NMS_THRESH
    if cfg.MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST:
        ocfg.MODEL.RPN.POST_NMS_TOPK_TEST = cfg.MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST
    ocfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    return ocfg


class TwoBranchInputs:
    """Input normalisation shared by the CLIP meta-architectures: the recognition branch
    (CLIP) and the localization branch (the RPN, its own format and mean/std)."""

    def _init_inputs(self, pixel_mean, pixel_std, input_format, offline_pixel_mean, offline_pixel_std,
                     offline_input_format):
        self.input_format = input_format
        self.offline_input_format = offline_input_format
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.register_buffer("offline_pixel_mean", torch.tensor(offline_pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("offline_pixel_std", torch.tensor(offline_pixel_std).view(-1, 1, 1), False)
        # official convention: a mean summing to < 3 means the model works on 0..1 input
        self.div_pixel = float(np.sum(pixel_mean)) < 3.0
        self.offline_div_pixel = float(np.sum(offline_pixel_mean)) < 3.0

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs):
        """Recognition branch input: RGB, /255 when the mean is in 0..1 units, CLIP
        normalisation, zero padding (in normalised space) to the batch's largest size."""
        images = [self._to_format(x["image"], self.input_format).to(self.device) for x in batched_inputs]
        if self.div_pixel:
            images = [x / 255.0 for x in images]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        if getattr(self, "channels_last", False):
            images.tensor = images.tensor.contiguous(memory_format=torch.channels_last)
        # images smaller than the backbone's total stride are padded (zeros) to 32 px;
        # larger ones are left as they are, like the official code
        h, w = images.tensor.shape[-2:]
        if h < 32 or w < 32:
            t = torch.nn.functional.pad(images.tensor, (0, max(0, 32 - w), 0, max(0, 32 - h)))
            images = ImageList(t, images.image_sizes)
        return images

    def offline_preprocess_image(self, batched_inputs):
        """RPN branch input: its own format, mean/std, padded to its size divisibility."""
        images = [self._to_format(x["image"], self.offline_input_format).to(self.device).float()
                  for x in batched_inputs]
        if self.offline_div_pixel:
            images = [x / 255.0 for x in images]
        images = [(x - self.offline_pixel_mean) / self.offline_pixel_std for x in images]
        return ImageList.from_tensors(images, self.offline_backbone.size_divisibility)

    def _to_format(self, image: torch.Tensor, fmt: str) -> torch.Tensor:
        # Inputs follow cfg.INPUT.FORMAT (the recognition branch's); flip for the other format.
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"each input 'image' must be a [3, H, W] tensor in {self.input_format} order, "
                             f"got shape {tuple(image.shape)}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"an input image is empty (shape {tuple(image.shape)}): give an image with pixels")
        if fmt != self.input_format and {fmt, self.input_format} == {"RGB", "BGR"}:
            image = image.flip(0)
        return image.float()



@META_ARCH_REGISTRY.register()
class CLIPFastRCNN(TwoBranchInputs, nn.Module):
    """Two branches: localization (a frozen detectron2 backbone + RPN, its own input
    format and normalisation) and recognition (a CLIP ResNet + CLIP RoI head).

    Regions come from ``region_type``: ``RPN`` (the RPN branch), ``GT`` (the boxes of
    each input's ``instances``) or ``PROPOSALS`` (each input's ``proposals``).
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
                 lang_encoder_loaded: bool = False, rpn_weights_file: str = ""):
        super().__init__()
        if region_type not in REGION_TYPES:
            raise ValueError(f"MODEL.CLIP.CROP_REGION_TYPE={region_type!r}: use one of {REGION_TYPES}")
        if region_type == "RPN" and (offline_backbone is None or offline_proposal_generator is None):
            raise ValueError("region type RPN needs the RPN branch (MODEL.CLIP.OFFLINE_RPN_CONFIG)")
        self.backbone = backbone
        self.roi_heads = roi_heads
        self.lang_encoder = lang_encoder
        self.offline_backbone = offline_backbone
        self.offline_proposal_generator = offline_proposal_generator
        self.region_type = region_type
        self._init_inputs(pixel_mean, pixel_std, input_format, offline_pixel_mean, offline_pixel_std,
                          offline_input_format)
        self.train_offline_rpn = train_offline_rpn
        self.prompt_templates = prompt_templates
        if inference_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"MODEL.CLIP.INFERENCE_DTYPE={inference_dtype!r}: use float32 or bfloat16")
        self.inference_dtype = inference_dtype
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        # where the RPN branch's weights came from (MODEL.CLIP.BB_RPN_WEIGHTS): they win over a
        # later checkpoint's offline_* keys (see checkpoint.loading.install_load_hook)
        self._rpn_weights_file = rpn_weights_file
        self.lang_encoder_loaded = lang_encoder_loaded  # becomes True when text-encoder weights arrive
        if self.offline_backbone is not None and not train_offline_rpn:
            for m in (self.offline_backbone, self.offline_proposal_generator):
                for p in m.parameters():
                    p.requires_grad = False
        if self.lang_encoder is not None:
            for p in self.lang_encoder.parameters():
                p.requires_grad = False
        self._vocab_specs = {}  # "train"/"test" -> vocabulary given as names
        self._stale_vocab = set()  # names-based vocabularies to re-embed (after new weights)
        install_load_hook(self)
        self.register_load_state_dict_post_hook(self._after_load)
        for split, vocab in (("train", train_vocabulary), ("test", test_vocabulary)):
            if torch.is_tensor(vocab):
                self.set_vocabulary(vocab, train=(split == "train"))
            elif vocab is not None:  # names: embedded on first use, after any weights are loaded
                self._vocab_specs[split] = list(vocab)
                self._stale_vocab.add(split)

    @staticmethod
    def _after_load(module, incompatible_keys):
        # new language-encoder weights: vocabularies given as names are embedded again
        if not any(k.startswith("lang_encoder.") for k in incompatible_keys.missing_keys):
            module.lang_encoder_loaded = True
        module._stale_vocab |= set(module._vocab_specs)

    def _refresh_vocabulary(self):
        with _VOCABULARY_LOCK:  # concurrent first calls: one thread embeds, the others wait for it
            for split in sorted(self._stale_vocab):
                self.set_vocabulary(self._vocab_specs[split], train=(split == "train"))
            self._stale_vocab.clear()

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
        }
        if c.CROP_REGION_TYPE == "RPN":
            ocfg = build_offline_rpn_cfg(cfg)
            ob = build_backbone(ocfg)
            ret.update(offline_backbone=ob,
                       offline_proposal_generator=build_proposal_generator(ocfg, ob.output_shape()),
                       offline_pixel_mean=ocfg.MODEL.PIXEL_MEAN, offline_pixel_std=ocfg.MODEL.PIXEL_STD,
                       offline_input_format=ocfg.INPUT.FORMAT)
        ret.update(load_from_cfg(cfg, ret))
        return ret

    # ------------------------------------------------------------------ helpers
    @property
    def clip_resnet(self):
        """The CLIP ResNet (``backbone`` in C4, ``backbone.bottom_up`` in FPN)."""
        return getattr(self.backbone, "bottom_up", self.backbone)

    @property
    def embed_dim(self) -> int:
        return self.clip_resnet.embed_dim

    @property
    def class_names(self) -> Optional[List[str]]:
        if self._stale_vocab:
            self._refresh_vocabulary()
        return self.roi_heads.box_predictor.class_names

    def train(self, mode: bool = True):
        super().train(mode)
        if self.offline_backbone is not None and not self.train_offline_rpn:
            self.offline_backbone.eval()  # the RPN branch is always in eval mode when frozen
            self.offline_proposal_generator.eval()
        if self.lang_encoder is not None:
            self.lang_encoder.eval()
        return self

    def embed_vocabulary(self, vocabulary) -> (torch.Tensor, List[str]):
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
                       names: Optional[Sequence[str]] = None, train: bool = False):
        """Set the vocabulary used by the next inference (or training, with ``train=True``).

        ``vocabulary``: class names (a list, a builtin name such as ``coco`` / ``lvis``, a
        .txt/.json file, or ``"a,b,c"``), embedded with the model's language encoder
        (cached on disk), or a ``[C, D]`` tensor of text embeddings (then ``names`` is optional).

        Thread safety: the embeddings and names are replaced together, under a lock. Calls
        of the model running in other threads meanwhile each use either the old or the new
        vocabulary, entirely, but which one is not defined (nor which one ``class_names``
        names): change the vocabulary while no prediction is in flight.
        """
        if torch.is_tensor(vocabulary):
            emb = vocabulary
            if names is not None and len(names) != emb.shape[0]:
                raise ValueError(f"{len(names)} names given for {emb.shape[0]} embeddings")
        else:
            emb, names = self.embed_vocabulary(vocabulary)
        pred = self.roi_heads.box_predictor
        with _VOCABULARY_LOCK:
            if not torch.is_tensor(vocabulary):
                self._vocab_specs["train" if train else "test"] = list(names)
            if train:
                pred.set_train_vocabulary(emb, names)
            else:
                pred.set_test_vocabulary(emb, names)
        return names

    # ------------------------------------------------------------------ regions
    def get_regions(self, batched_inputs, gt_instances=None) -> List[Instances]:
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
            return regions
        if self.region_type == "PROPOSALS":
            regions = []
            for x in batched_inputs:
                if "proposals" not in x:
                    raise ValueError("MODEL.CLIP.CROP_REGION_TYPE is 'PROPOSALS' but an input has no 'proposals'")
                regions.append(x["proposals"].to(self.device))
            return regions
        with torch.set_grad_enabled(self.training and self.train_offline_rpn):
            images = self.offline_preprocess_image(batched_inputs)
            features = self.offline_backbone(images.tensor)
            proposals, losses = self.offline_proposal_generator(
                images, features, gt_instances if self.training and self.train_offline_rpn else None)
        self._rpn_losses = losses if self.training and self.train_offline_rpn else {}
        return [p.to(self.device) for p in proposals]

    def region_encoder(self):
        return self.clip_resnet.encode_pooled_regions

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
            emb = self.roi_heads.encode_boxes(features, boxes, region_encoder=self.region_encoder())
        return list(torch.nn.functional.normalize(emb.float(), dim=-1).split([len(b) for b in boxes]))

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        if self._stale_vocab:
            self._refresh_vocabulary()
        if not self.training:
            return self.inference(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs] \
            if "instances" in batched_inputs[0] else None
        regions = self.get_regions(batched_inputs, gt_instances)
        if self.region_type == "GT":
            for r in regions:
                r.objectness_logits = torch.ones(len(r), device=self.device)
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        _, losses = self.roi_heads(images, features, regions, gt_instances, region_encoder=self.region_encoder())
        losses.update(getattr(self, "_rpn_losses", {}))
        return losses

    def inference(self, batched_inputs: List[Dict], do_postprocess: bool = True):
        """Detections for each input (``instances`` in the input's height/width).
        Runs under ``torch.inference_mode``; with ``INFERENCE_DTYPE bfloat16`` the
        networks run under autocast (scores and boxes come back as float32)."""
        assert not self.training
        if self._stale_vocab:  # outside inference mode: the embeddings may serve training later
            self._refresh_vocabulary()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) \
            if self.inference_dtype == "bfloat16" else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return self._inference(batched_inputs, do_postprocess)

    def _inference(self, batched_inputs, do_postprocess):
        regions = self.get_regions(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        results = [None] * len(batched_inputs)
        nonempty = [i for i, r in enumerate(regions) if len(r) > 0]
        if nonempty:
            features = self.backbone(images.tensor)
            if len(nonempty) < len(regions):
                features = {k: v[nonempty] for k, v in features.items()}
                sub_images = ImageList(images.tensor[nonempty], [images.image_sizes[i] for i in nonempty])
            else:
                sub_images = images
            outs, _ = self.roi_heads(sub_images, features, [regions[i] for i in nonempty], None,
                                     region_encoder=self.region_encoder())
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


class _Parts(nn.Module):
    """The detector's submodules under the detector's attribute names, before the detector
    exists: its state-dict keys are the detector's, so files are checked and loaded as if
    into the detector."""

    def __init__(self, parts: Dict):
        super().__init__()
        for name in ("backbone", "roi_heads", "lang_encoder", "offline_backbone", "offline_proposal_generator"):
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
