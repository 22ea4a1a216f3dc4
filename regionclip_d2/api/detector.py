"""The :class:`Detector`: build once, call with images and any classes (see the package docstring)."""
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from detectron2.structures import Boxes, Instances

from ..data.vocabularies import check_vocabulary, load_vocabulary
from .inputs import (
    ClassSpec,
    DetectorInputError,
    Exemplar,
    _boxes_array,
    _check_boxes_in_image,
    _check_readable,
    _is_image,
    load_rgb,
)
from .results import Detections

logger = logging.getLogger(__name__)


def _module_signature(module: torch.nn.Module) -> tuple:
    """Cheap identity of a module's current tensors: storage and in-place version of each. Changes
    when weights are loaded (``copy_``), edited in place, replaced or moved."""
    return tuple((k, t.data_ptr(), t._version) for k, t in module.state_dict(keep_vars=True).items())


# ------------------------------------------------------------------------------------ detector
class Detector:
    """Open-vocabulary detection in one call: ``Detector.from_config(...)(images, classes)``.

    A detector holds a ``CLIPFastRCNN`` (``self.model``, in eval mode) and its config. Each call
    sets the call's vocabulary on the model (``model.set_vocabulary(tensor, names)``), so calls
    with different classes may follow each other freely; concurrent calls from several threads
    are serialised (they share the model's vocabulary).

    Class embeddings are cached in memory: a name by (name, prompt templates, text-encoder
    weights fingerprint), so a call embeds only names it has not seen with the current text
    encoder; an :class:`Exemplar` by (image content, boxes, the recognition branch's tensors).
    """

    def __init__(self, model, cfg, default_classes: Optional[Sequence[ClassSpec]] = None):
        """Wrap a built (and loaded) ``CLIPFastRCNN`` and its config (``cfg.INPUT.MIN_SIZE_TEST``,
        ``MAX_SIZE_TEST`` and ``FORMAT`` are used). ``default_classes``: the vocabulary of calls
        with ``classes=None`` (default: the model's test vocabulary, else its training one)."""
        if not hasattr(model, "set_vocabulary") or not hasattr(model, "encode_boxes"):
            raise DetectorInputError(f"Detector needs a CLIPFastRCNN (MODEL.META_ARCHITECTURE), got "
                                     f"{type(model).__name__}")
        self.model = model.eval()
        self.cfg = cfg.clone()
        self.cfg.freeze()
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise DetectorInputError(f"INPUT.FORMAT={self.input_format!r}: Detector supports RGB and BGR models")
        self.min_size_test = int(cfg.INPUT.MIN_SIZE_TEST)
        self.max_size_test = int(cfg.INPUT.MAX_SIZE_TEST)
        self._default = list(default_classes) if default_classes is not None else self._model_vocabulary()
        self._text_cache: Dict[tuple, torch.Tensor] = {}
        self._text_state: Tuple[tuple, str] = ((), "")
        self._exemplar_cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self.exemplar_cache_size = 256
        # (scale, bias) that puts exemplar classes' cosines on the text classes' scale; None: raw cosines
        self.exemplar_calibration: Optional[Tuple[float, float]] = None
        self._warned_uncalibrated = False
        self._lock = threading.RLock()

    def _model_vocabulary(self):
        """The model's own active (eval) vocabulary: names, or ``(embeddings, names)`` for a tensor."""
        pred = self.model.roi_heads.box_predictor
        for vocab in (pred.test_vocabulary, pred.train_vocabulary):
            if len(vocab) == 0:
                continue
            if vocab.from_names:
                return list(vocab.names)
            return (vocab.embeddings.detach().cpu().clone(), list(vocab.names) if vocab.names else None)
        return None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config, weights: Optional[str] = None, device: str = "auto", opts: Sequence = (), *,
                    clip_weights: Optional[str] = None, rpn_weights: Optional[str] = None,
                    trust_checkpoints: bool = False, allow_random_weights: bool = False) -> "Detector":
        """Build a detector the way ``DefaultPredictor`` does, with the project's safe checkpointer.

        Args:
            config: a config file (a path, or one shipped with the package, e.g.
                ``configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml``) or a
                detectron2 ``CfgNode`` (cloned, not changed).
            weights: the detector / RegionCLIP checkpoint (``MODEL.WEIGHTS``).
            device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
            opts: config overrides ``[KEY, VALUE, ...]`` as for ``get_regionclip_cfg``.
            clip_weights: CLIP weights for the backbone and text encoder (``MODEL.CLIP.CLIP_WEIGHTS``).
            rpn_weights: the RPN branch (``MODEL.CLIP.BB_RPN_WEIGHTS``).
            trust_checkpoints: load files that need unpickling Python objects (``.pkl``, old
                checkpoints); they can run code, so only for files you trust
                (``MODEL.CLIP.TRUST_CHECKPOINTS``). Otherwise files are loaded weights-only.
            allow_random_weights: run with randomly initialised weights (a smoke test; the
                detections are meaningless). Without it, a config that names no weights is an error.
        The config's vocabulary (``VOCABULARY`` / ``OPENSET_TEST_VOCABULARY`` names, or an
        embedding file) is what calls with ``classes=None`` use.
        """
        from detectron2.config import CfgNode
        from detectron2.modeling import build_model

        from .. import get_regionclip_cfg
        from ..checkpoint import RegionCLIPCheckpointer

        if isinstance(config, CfgNode):
            cfg = config.clone()
            cfg.defrost()
            if opts:
                cfg.merge_from_list(list(opts))
        else:
            cfg = get_regionclip_cfg(os.fspath(config), list(opts))
        cfg.defrost()
        c = cfg.MODEL.CLIP
        if weights is not None:
            cfg.MODEL.WEIGHTS = os.fspath(weights)
        if clip_weights is not None:
            c.CLIP_WEIGHTS = os.fspath(clip_weights)
        if rpn_weights is not None:
            c.BB_RPN_WEIGHTS = os.fspath(rpn_weights)
        if trust_checkpoints:
            c.TRUST_CHECKPOINTS = True
        cfg.MODEL.DEVICE = _resolve_device(device)
        random, rpn_random = _random_branches(cfg)
        if (random or rpn_random) and not allow_random_weights:
            raise DetectorInputError(
                "no weights given: pass weights='detector_or_regionclip.pth' (MODEL.WEIGHTS)"
                + (" or clip_weights='RN50.pt'" if random else "")
                + (", and rpn_weights='rpn.pth' for the RPN branch" if rpn_random else "")
                + "; or allow_random_weights=True for a smoke test with random weights (meaningless detections)")
        if random or rpn_random:
            logger.warning("Detector: the %s weights are RANDOM: boxes and labels are meaningless",
                           _random_description(random, rpn_random))
        # The configured vocabulary of names is embedded by the Detector's per-name cache, not by the
        # model on its first call (the model would embed it even when a call gives other classes).
        # (Names set together with an embedding file are left for build_model to reject.)
        default, decided = None, False
        for names_key, path_key in (("OPENSET_TEST_VOCABULARY", "OPENSET_TEST_TEXT_EMB_PATH"),
                                    ("VOCABULARY", "TEXT_EMB_PATH")):
            if c[path_key]:
                decided = True  # an embedding file: the model's tensor vocabulary is the default
            elif c[names_key]:
                if not decided:
                    default, decided = load_vocabulary(c[names_key]), True
                c[names_key] = ""
        cfg.freeze()
        model = build_model(cfg)  # loads CLIP_WEIGHTS / BB_RPN_WEIGHTS and checks MODEL.WEIGHTS
        model.eval()
        if cfg.MODEL.WEIGHTS:
            RegionCLIPCheckpointer(model, trusted=c.TRUST_CHECKPOINTS).load(cfg.MODEL.WEIGHTS)
        return cls(model, cfg, default_classes=default)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def random_weights(self) -> str:
        """Which weights are random, by the config this detector was built from (the rule of
        :meth:`from_config`): ``""`` (none), ``"recognition"``, ``"RPN branch"`` or
        ``"recognition and RPN branch"``. Weights loaded into ``self.model`` by other means
        after construction are not seen."""
        return _random_description(*_random_branches(self.cfg))

    @property
    def default_classes(self) -> Optional[List[str]]:
        """The names of the vocabulary used with ``classes=None`` (None if there is none, or a
        configured embedding file without names)."""
        d = self._default
        if d is None:
            return None
        if isinstance(d, tuple):
            return d[1]
        return [c.name if isinstance(c, Exemplar) else c for c in d]

    # ------------------------------------------------------------------ embeddings
    def _text_key(self) -> Tuple[str, str]:
        enc = self.model.lang_encoder
        sig = _module_signature(enc)
        if sig != self._text_state[0]:
            from ..modeling.text import weights_fingerprint

            fp = weights_fingerprint(enc)
            if fp != self._text_state[1]:  # other weights: the cached embeddings are of no use any more
                self._text_cache.clear()
            self._text_state = (sig, fp)
        return self._text_state[1], str(self.model.prompt_templates)

    def text_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """``[C, D]`` unit-norm float32 text embeddings (CPU) of class names, with the model's prompt
        templates and text encoder; names not in the in-memory cache are embedded in one batch."""
        names = check_vocabulary(names, "classes")
        if self.model.lang_encoder is None:
            raise DetectorInputError("this model has no text encoder: give classes as Exemplar(...) only")
        key = self._text_key()
        new = [n for n in names if key + (n,) not in self._text_cache]
        if new:
            emb, _ = self.model.embed_vocabulary(new)
            for n, e in zip(new, emb.detach().float().cpu()):
                self._text_cache[key + (n,)] = e
        return torch.stack([self._text_cache[key + (n,)] for n in names])

    def _exemplar_images(self, exemplar: Exemplar):
        """The exemplar's images (RGB arrays) and their checked boxes."""
        pairs = exemplar.pairs()
        arrays = [load_rgb(im, f"Exemplar {exemplar.name!r}, image {i}") for i, (im, _) in enumerate(pairs)]
        boxes = [_check_boxes_in_image(b, a.shape[0], a.shape[1], f"Exemplar {exemplar.name!r}, image {i}")
                 for i, (a, (_, b)) in enumerate(zip(arrays, pairs))]
        return arrays, boxes

    def region_embeddings(self, rgb: np.ndarray, boxes) -> torch.Tensor:
        """``[R, D]`` unit-norm float32 region embeddings (CPU) of ``boxes`` (XYXY, original pixels)
        of an RGB image, the image prepared as the detector prepares its inputs."""
        inp, tfm = self._model_input(rgb)
        scaled = torch.as_tensor(tfm.apply_box(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),
                                 dtype=torch.float32).reshape(-1, 4)
        return self.model.encode_boxes([inp], [scaled])[0].float().cpu()

    def exemplar_embedding(self, exemplar: Exemplar) -> torch.Tensor:
        """``[D]`` unit-norm float32 embedding (CPU) of an :class:`Exemplar`: the mean of the
        L2-normalised region embeddings (``model.encode_boxes``) of its boxes, each image prepared
        as the detector prepares its inputs (resized to the test size, boxes scaled with it),
        normalised again."""
        arrays, boxes = self._exemplar_images(exemplar)
        key = (_module_signature(self.model.backbone), _module_signature(self.model.roi_heads),
               tuple((a.shape, hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest(), b.tobytes())
                     for a, b in zip(arrays, boxes)))
        if key in self._exemplar_cache:
            self._exemplar_cache.move_to_end(key)
            return self._exemplar_cache[key]
        regions = [self.region_embeddings(a, b) for a, b in zip(arrays, boxes)]
        emb = torch.nn.functional.normalize(torch.cat(regions).mean(dim=0), dim=0)
        self._exemplar_cache[key] = emb
        while len(self._exemplar_cache) > self.exemplar_cache_size:
            self._exemplar_cache.popitem(last=False)
        return emb

    def calibrate_exemplars(self, references: Sequence[Exemplar], grid: int = 3) -> Dict[str, float]:
        """Fit the map that puts exemplar classes on the text classes' scale, and use it from now on.

        An exemplar embedding is a region embedding, so a region's cosine with it is far higher
        (about 0.9 for any region) than with a class name's text embedding (a few hundredths):
        mixed in one vocabulary, exemplar classes would win every region. Each ``reference`` is
        an :class:`Exemplar` whose ``name`` is also a class name, with at least 2 boxes. For each,
        the positives are its boxes (each compared with the mean of the *other* boxes, so no box
        matches itself) and the negatives the other references' boxes and a ``grid x grid`` grid
        of boxes plus the whole image on every reference image. The map ``cos -> a cos + b``
        sends the mean exemplar cosine of positives and of negatives to the mean text cosine of
        the same regions with the class name (averaged over the references). Afterwards every
        :class:`Exemplar` class of a call scores ``(a cos + b) / T``; name classes are unchanged.
        ``detector.exemplar_calibration = None`` goes back to raw cosines.

        Returns ``{"scale": a, "bias": b, "positive_exemplar_cos", "negative_exemplar_cos",
        "positive_text_cos", "negative_text_cos"}``.
        """
        refs = list(references) if not isinstance(references, Exemplar) else [references]
        if not refs or not all(isinstance(r, Exemplar) for r in refs):
            raise DetectorInputError("calibrate_exemplars: give a list of Exemplar(name, image, boxes) whose names "
                                     "are class names (e.g. classes with annotated boxes in a validation set)")
        per_ref, background = [], []
        for ref in refs:
            arrays, boxes = self._exemplar_images(ref)
            if sum(len(b) for b in boxes) < 2:
                raise DetectorInputError(f"calibrate_exemplars: Exemplar {ref.name!r} has fewer than 2 boxes; each "
                                         "reference needs 2 or more (every box is compared with the others' mean)")
            per_ref.append(torch.cat([self.region_embeddings(a, b) for a, b in zip(arrays, boxes)]))
            for a in arrays:
                h, w = a.shape[:2]
                cells = [[x * w / grid, y * h / grid, (x + 1) * w / grid, (y + 1) * h / grid]
                         for x in range(grid) for y in range(grid)] + [[0, 0, w, h]]
                background.append(self.region_embeddings(a, cells))
        # in float64: the map divides by a difference of two cosines near 1
        text = self.text_embeddings([r.name for r in refs]).double()
        background = torch.cat(background).double()
        per_ref = [r.double() for r in per_ref]
        stats = []
        for k, regions in enumerate(per_ref):
            total = regions.sum(dim=0)
            # each box against the mean of the other boxes of its reference
            loo = torch.nn.functional.normalize((total[None] - regions) / (len(regions) - 1), dim=-1)
            pos_e = (regions * loo).sum(dim=-1).mean()
            pos_t = (regions @ text[k]).mean()
            e = torch.nn.functional.normalize(total, dim=0)
            neg = torch.cat([background] + [r for j, r in enumerate(per_ref) if j != k])
            stats.append(torch.stack([pos_e, (neg @ e).mean(), pos_t, (neg @ text[k]).mean()]))
        pe, ne, pt, nt = torch.stack(stats).mean(dim=0).tolist()
        if pe - ne <= 1e-6:
            raise DetectorInputError(f"calibrate_exemplars: the references' boxes are no closer to their own "
                                     f"exemplars ({pe:.3f}) than other regions are ({ne:.3f}): give references whose "
                                     "boxes show their class")
        a = (pt - nt) / (pe - ne)
        b = pt - a * pe
        self.exemplar_calibration = (a, b)
        return {"scale": a, "bias": b, "positive_exemplar_cos": pe, "negative_exemplar_cos": ne,
                "positive_text_cos": pt, "negative_text_cos": nt}

    def logit_affine(self, classes=None) -> Optional[torch.Tensor]:
        """``[C, 2]`` (scale, bias) per class of a call's ``classes``: the exemplar calibration for
        :class:`Exemplar` classes, the identity for names; None when no class needs one."""
        if classes is None or isinstance(classes, str):
            return None
        items = [classes] if isinstance(classes, Exemplar) else list(classes)
        if not any(isinstance(c, Exemplar) for c in items):
            return None
        if self.exemplar_calibration is None:
            if any(isinstance(c, str) for c in items) and not self._warned_uncalibrated:
                self._warned_uncalibrated = True
                logger.warning("Detector: classes mix names and Exemplar(...) without calibration: an exemplar's "
                               "cosine with any region is far higher than a name's, so exemplar classes will take "
                               "most regions. Call detector.calibrate_exemplars([...]) with reference exemplars of "
                               "named classes first (README, 'Mixing exemplars with names')")
            return None
        a, b = self.exemplar_calibration
        return torch.tensor([[a, b] if isinstance(c, Exemplar) else [1.0, 0.0] for c in items], dtype=torch.float32)

    def vocabulary(self, classes=None) -> Tuple[torch.Tensor, Optional[List[str]]]:
        """``([C, D] embeddings, C names)`` of a call's ``classes`` (see :meth:`__call__`)."""
        if classes is None:
            if self._default is None:
                raise DetectorInputError("no vocabulary: pass classes=['cat', 'dog', ...] (names or Exemplar(...)), "
                                         "or set MODEL.CLIP.VOCABULARY in the config")
            if isinstance(self._default, tuple):
                return self._default
            classes = self._default
        if isinstance(classes, str):
            classes = load_vocabulary(classes)
        elif isinstance(classes, Exemplar):
            classes = [classes]
        try:
            classes = list(classes)
        except TypeError:
            raise DetectorInputError(f"classes must be a list of names and Exemplar(...), got "
                                     f"{type(classes).__name__}") from None
        if not classes:
            raise DetectorInputError("classes is empty: give at least one class name or Exemplar(...), or "
                                     "classes=None for the configured vocabulary")
        bad = [c for c in classes if not isinstance(c, (str, Exemplar))]
        if bad:
            raise DetectorInputError(f"classes: each class is a name (str) or an Exemplar(...), got "
                                     f"{type(bad[0]).__name__} ({str(bad[0])[:50]!r})")
        names = check_vocabulary([c.name if isinstance(c, Exemplar) else c for c in classes], "classes")
        text_idx = [i for i, c in enumerate(classes) if isinstance(c, str)]
        rows: List[Optional[torch.Tensor]] = [None] * len(classes)
        if text_idx:
            for i, e in zip(text_idx, self.text_embeddings([names[i] for i in text_idx])):
                rows[i] = e
        for i, c in enumerate(classes):
            if isinstance(c, Exemplar):
                rows[i] = self.exemplar_embedding(c)
        return torch.stack(rows), names

    # ------------------------------------------------------------------ inputs
    def _transform(self, h: int, w: int):
        """``DefaultPredictor``'s ``ResizeShortestEdge([MIN_SIZE_TEST], MAX_SIZE_TEST)`` for an
        ``h x w`` image (without drawing from numpy's global random state)."""
        from detectron2.data import transforms as T

        if self.min_size_test == 0:
            return T.NoOpTransform()
        newh, neww = T.ResizeShortestEdge.get_output_shape(h, w, self.min_size_test, self.max_size_test)
        return T.ResizeTransform(h, w, newh, neww)

    def _model_input(self, rgb: np.ndarray, boxes: Optional[np.ndarray] = None):
        """(the model's input dict, the resize transform) for an RGB image and optional regions
        (``[R, 4]`` XYXY original pixels, for GT / PROPOSALS region types)."""
        h, w = rgb.shape[:2]
        tfm = self._transform(h, w)
        image = tfm.apply_image(rgb)
        if self.input_format == "BGR":
            image = image[:, :, ::-1]
        inp = {"image": torch.as_tensor(image.astype("float32").transpose(2, 0, 1)), "height": h, "width": w}
        if boxes is not None:
            size = image.shape[:2]
            b = Boxes(torch.as_tensor(tfm.apply_box(boxes), dtype=torch.float32).reshape(-1, 4))
            if self.model.region_type == "GT":
                inp["instances"] = Instances(size, gt_boxes=b, gt_classes=torch.zeros(len(b), dtype=torch.long))
            else:
                inp["proposals"] = Instances(size, proposal_boxes=b)
        return inp, tfm

    # ------------------------------------------------------------------ detection
    def __call__(self, images, classes=None, threshold: Union[float, Mapping[str, float]] = 0.3,
                 batch_size: int = 4, return_instances: bool = False, *, boxes=None,
                 default_threshold: float = 0.3):
        """Detect ``classes`` in ``images``.

        Args:
            images: one image or a list of them; an image is a file path, a PIL image, or an
                ``H x W x 3`` uint8 numpy array in **RGB** order (``cv2.imread`` gives BGR: pass
                ``img[:, :, ::-1]``). Each is resized like ``DefaultPredictor`` does
                (shortest edge ``INPUT.MIN_SIZE_TEST``, longest at most ``INPUT.MAX_SIZE_TEST``).
            classes: the vocabulary: a list whose items are class names or :class:`Exemplar`
                (mixed freely; the label ids follow the list's order), a builtin vocabulary name
                (``"coco"``, ``"lvis"``...), a names file or ``"a,b,c"``; None for the configured
                vocabulary. Names must be distinct.
            threshold: minimum score kept, in [0, 1]: one number, or ``{class name: score}``
                (classes missing from it use ``default_threshold``; see
                :func:`regionclip_d2.evaluation.thresholds.calibrate_thresholds`). Detections below
                the config's ``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` are never produced.
            batch_size: images per forward pass of the model.
            return_instances: also return each image's detectron2 ``Instances``.
            boxes: only for configs whose regions are given (``MODEL.CLIP.CROP_REGION_TYPE`` GT or
                PROPOSALS, e.g. ``..._zsinf_GT.yaml``): the regions to classify, ``[R, 4]`` XYXY in
                original pixels, one per image (a list of them for a list of images).
            default_threshold: the threshold of classes missing from a ``threshold`` mapping.
        Returns:
            a :class:`Detections` for one image, a list of them (in order) for a list.
        Raises:
            DetectorInputError (a ValueError) for unusable images, boxes, classes or options,
            before any model work.
        """
        single = _is_image(images) or torch.is_tensor(images)
        items = [images] if single else images
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            try:
                items = list(items)
            except TypeError:
                raise DetectorInputError(f"images: give a path, a PIL image, an H x W x 3 uint8 RGB array or a list "
                                         f"of them, got {type(images).__name__}") from None
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DetectorInputError(f"batch_size={batch_size!r}: give a whole number >= 1")
        for i, x in enumerate(items):
            if not _is_image(x) and not torch.is_tensor(x):
                raise DetectorInputError(f"image {i}: give a path, a PIL image or an H x W x 3 uint8 RGB array, got "
                                         f"{type(x).__name__}")
            _check_readable(x, "image" if single else f"image {i}")
        from ..evaluation.thresholds import class_thresholds

        region_boxes = self._region_boxes(boxes, len(items), single)
        results = []
        with self._lock:  # the caches and the model's vocabulary are shared by all calls
            emb, names = self.vocabulary(classes)
            label_names = names if names is not None else [str(i) for i in range(emb.shape[0])]
            thresholds = class_thresholds(threshold, label_names, default_threshold)
            self.model.set_vocabulary(emb, names, logit_affine=self.logit_affine(classes))
            for start in range(0, len(items), batch_size):
                inputs = []
                for i in range(start, min(start + batch_size, len(items))):
                    rgb = load_rgb(items[i], "image" if single else f"image {i}")
                    b = None
                    if region_boxes is not None:
                        b = _check_boxes_in_image(region_boxes[i], rgb.shape[0], rgb.shape[1], f"boxes of image {i}") \
                            if len(region_boxes[i]) else region_boxes[i]
                    inputs.append(self._model_input(rgb, b)[0])
                with torch.no_grad():
                    outputs = self.model(inputs)
                for inp, out in zip(inputs, outputs):
                    results.append(self._result(out["instances"], label_names, thresholds,
                                                (inp["height"], inp["width"]), return_instances))
        return results[0] if single else results

    def _region_boxes(self, boxes, n: int, single: bool) -> Optional[List[np.ndarray]]:
        given = self.model.region_type in ("GT", "PROPOSALS")
        if boxes is None:
            if given:
                raise DetectorInputError(f"this config classifies given regions (MODEL.CLIP.CROP_REGION_TYPE="
                                         f"{self.model.region_type}): pass boxes=[[x0, y0, x1, y1], ...] per image, "
                                         "or use a config with RPN regions (e.g. ..._zsinf.yaml)")
            return None
        if not given:
            raise DetectorInputError("boxes= is for configs whose MODEL.CLIP.CROP_REGION_TYPE is GT or PROPOSALS "
                                     "(e.g. ..._zsinf_GT.yaml); this detector finds its own regions (RPN)")
        per_image = [boxes] if single else list(boxes)
        if len(per_image) != n:
            raise DetectorInputError(f"boxes: {len(per_image)} box lists for {n} images: give one [R, 4] per image")
        return [_boxes_array(b, f"boxes of image {i}") if len(b) else np.zeros((0, 4), np.float32)
                for i, b in enumerate(per_image)]

    @staticmethod
    def _result(inst: Instances, names: List[str], thresholds: np.ndarray, size: Tuple[int, int],
                return_instances: bool) -> Detections:
        inst = inst.to("cpu")
        classes = inst.pred_classes.long()
        keep = inst.scores.float() >= torch.as_tensor(thresholds, dtype=torch.float32)[classes]
        inst = inst[keep]
        order = torch.argsort(inst.scores, descending=True, stable=True)
        inst = inst[order]
        ids = inst.pred_classes.long().numpy().astype(np.int64)
        return Detections(boxes=inst.pred_boxes.tensor.float().numpy().astype(np.float32).reshape(-1, 4),
                          scores=inst.scores.float().numpy().astype(np.float32),
                          labels=[names[i] for i in ids], label_ids=ids, class_names=list(names),
                          image_size=size, instances=inst if return_instances else None)


def _random_branches(cfg) -> Tuple[bool, bool]:
    """``(recognition random, RPN branch random)``: no file in the config initialises them."""
    c = cfg.MODEL.CLIP
    random = not cfg.MODEL.WEIGHTS and not c.CLIP_WEIGHTS
    rpn_random = c.CROP_REGION_TYPE == "RPN" and not c.BB_RPN_WEIGHTS and not cfg.MODEL.WEIGHTS
    return bool(random), bool(rpn_random)


def _random_description(random: bool, rpn_random: bool) -> str:
    if random and rpn_random:
        return "recognition and RPN branch"
    return "recognition" if random else ("RPN branch" if rpn_random else "")


def _resolve_device(device: str) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    d = str(device)
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise DetectorInputError(f"device={d!r} but CUDA is not available here: use device='cpu' or 'auto'")
    return d
