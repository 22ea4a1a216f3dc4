"""Grounding data: image-caption pairs whose boxes are tied to phrases of the caption.

**The format** (MDETR's, used by GLIP for GoldG = Flickr30k Entities + Visual Genome/GQA):
a COCO instances JSON whose ``images`` are image-caption *pairs* and whose annotations name
the caption characters that refer to them::

    {"images": [{"id": 1, "file_name": "a.jpg", "height": 480, "width": 640,
                 "caption": "two red stars next to a blue ring",
                 "tokens_positive_eval": [[[0, 13]], [[22, 33]]]}, ...],     # optional
     "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [x, y, w, h],
                      "tokens_positive": [[0, 13]], "phrase_ids": 0}, ...],     # phrase_ids optional
     "categories": [{"id": 1, "name": "object"}]}

``tokens_positive`` is a list of ``[start, end)`` character spans into the entry's
``caption`` (several spans: the box is named in several places). Several image entries may
share one ``file_name`` (one per caption). MDETR's released annotations
(``final_flickr_separateGT_{train,val,test}.json``, ``final_mixed_train_no_coco.json``) are
in this format as they are; Flickr30k Entities' own files (``Sentences/*.txt`` with
``[/EN#id/type phrase]`` markup, ``Annotations/*.xml``) convert to it with
:mod:`regionclip_d2.grounding.flickr30k`.

* :func:`load_grounding_json` validates a file and returns detectron2 dataset dicts (one
  per image-caption pair); :func:`register_grounding_dataset` registers one in
  ``DatasetCatalog`` (read when first used, like ``register_coco_format``).
* :func:`detection_to_grounding`: detection dataset dicts + their class list -> grounding
  dicts whose caption is the class prompt (``"circle. square. ring."``, chunked like
  :func:`~regionclip_d2.grounding.prompts.build_class_prompts`).
* :func:`grounding_positive_map`: a dict's token targets ``[num_boxes, context_length]``.

**Checks** (:class:`GroundingDataError`, naming the file, the entry and the fix): an image
entry without a caption (or an empty one), an annotation without ``tokens_positive``, a span
that is not two integers, empty (``end <= start``), outside the caption, covering only
whitespace or (with ``strict_spans``, the default) starting or ending inside a word (the
spans were computed on another text); with a tokenizer, a caption longer than the text
tower's context (``on_too_long="skip"`` drops the entry instead, counted and logged).
Handled and counted: annotations with an empty ``tokens_positive`` list (dropped: a box no
phrase names is no grounding target), and everything ``check_coco_annotations`` repairs
(boxes clipped or dropped, missing images dropped, annotation ids renumbered).
"""
import copy
import logging
import os
from collections import Counter
from typing import Dict, List, Optional, Sequence

import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ..data.datasets import AnnotationError, _check_structure, _is_id, _read_json, check_coco_annotations
from .prompts import build_class_prompts
from .tokens import PromptTooLongError, tokenize_with_offsets

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("original_img_id", "sentence_id", "dataset_name", "tokens_negative", "tokens_withheld")  # kept as is
FORMAT_HINT = ("grounding files are COCO JSON whose images carry a 'caption' and whose annotations carry "
               "'tokens_positive' ([start, end) character spans of the caption), as MDETR's annotations are")


class GroundingDataError(AnnotationError):
    """Grounding annotations that do not match their captions."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_span(span, caption: str, where: str, strict: bool = True):
    """Raise :class:`GroundingDataError` unless ``span`` is a valid ``[start, end)`` of ``caption``."""
    if not isinstance(span, (list, tuple)) or len(span) != 2 or not all(_is_int(v) for v in span):
        raise GroundingDataError(f"{where}: span {str(span)[:80]} is not [start, end) (two integers): give "
                                 "character offsets into the caption")
    a, b = span
    if b <= a:
        raise GroundingDataError(f"{where}: span [{a}, {b}) is empty: a span names at least one character "
                                 "(end > start; end is exclusive)")
    if a < 0 or b > len(caption):
        raise GroundingDataError(f"{where}: span [{a}, {b}) lies outside the caption {caption[:80]!r} "
                                 f"({len(caption)} characters): spans are [start, end) offsets into this "
                                 "entry's own caption")
    if not caption[a:b].strip():
        raise GroundingDataError(f"{where}: span [{a}, {b}) of {caption[:80]!r} is only whitespace: point it at "
                                 "the phrase")
    if strict and ((a > 0 and caption[a - 1].isalnum() and caption[a].isalnum())
                   or (b < len(caption) and caption[b - 1].isalnum() and caption[b].isalnum())):
        raise GroundingDataError(
            f"{where}: span [{a}, {b}) = {caption[a:b]!r} starts or ends inside a word of {caption[:80]!r}: the "
            "spans do not match this caption (computed on another version of it?); fix them, or pass "
            "strict_spans=False to accept spans that cut words")


def _spans(value, caption, where, strict, nested=False) -> List[List[int]]:
    if not isinstance(value, (list, tuple)):
        raise GroundingDataError(f"{where}: {str(value)[:80]} is not a list of [start, end) spans")
    out = []
    for k, span in enumerate(value):
        check_span(span, caption, f"{where}[{k}]", strict)
        out.append([int(span[0]), int(span[1])])
    return out


def check_grounding_annotations(data: dict, json_file: str, strict_spans: bool = True) -> Dict[str, int]:
    """Check captions and spans of a grounding dict (see the module docstring) in place; drop
    annotations with no span. Returns counts of what was handled."""
    _check_structure(data, json_file)
    stats = Counter()
    captions = {}
    for i, im in enumerate(data["images"]):
        where = f"{json_file}: images[{i}] (id {im['id']!r}, {im['file_name']!r})"
        cap = im.get("caption")
        if not isinstance(cap, str):
            raise GroundingDataError(f"{where} has no 'caption' (a string): {FORMAT_HINT}; detection data without "
                                     "captions goes through register_coco_format and detection_to_grounding")
        if not cap.strip():
            raise GroundingDataError(f"{where} has an empty caption: give the caption its boxes' phrases come "
                                     "from, or leave the entry out")
        if "tokens_positive_eval" in im:
            tpe = im["tokens_positive_eval"]
            if not isinstance(tpe, list):
                raise GroundingDataError(f"{where}: tokens_positive_eval is not a list (one list of spans per "
                                         "phrase)")
            for k, phrase in enumerate(tpe):
                _spans(phrase, cap, f"{where}: tokens_positive_eval[{k}]", strict_spans)
        captions[im["id"]] = cap
    kept = []
    for i, a in enumerate(data["annotations"]):
        where = f"{json_file}: annotations[{i}] (id {str(a.get('id'))[:50]}, image_id {str(a.get('image_id'))[:50]})"
        if not isinstance(a, dict) or not _is_id(a.get("image_id")) or a["image_id"] not in captions:
            kept.append(a)  # check_coco_annotations names the unknown image
            continue
        if "tokens_positive" not in a:
            raise GroundingDataError(f"{where} lacks 'tokens_positive': give the [start, end) character spans of "
                                     "the caption phrase that names this box")
        spans = _spans(a["tokens_positive"], captions[a["image_id"]], f"{where}: tokens_positive", strict_spans)
        if not spans:
            stats["annotations with an empty tokens_positive (dropped)"] += 1
            continue
        if "phrase_ids" in a and not (_is_int(a["phrase_ids"]) or (isinstance(a["phrase_ids"], list)
                                                                  and all(_is_int(v) for v in a["phrase_ids"]))):
            raise GroundingDataError(f"{where}: phrase_ids {str(a['phrase_ids'])[:80]} is not an integer (or a list "
                                     "of integers)")
        a["tokens_positive"] = spans
        kept.append(a)
    data["annotations"] = kept
    for what, n in stats.items():
        logger.warning("%s: %d %s", json_file, n, what)
    return dict(stats)


def _positions(tokenized, spans) -> List[int]:
    pos = set()
    for a, b in spans:
        s, e = tokenized.token_span(a, b)
        pos.update(range(s, e))
    return sorted(pos)


def load_grounding_json(json_file: str, image_root: str, dataset_name: Optional[str] = None, tokenizer=None,
                        context_length: Optional[int] = None, on_too_long: str = "error", strict_spans: bool = True,
                        drop_missing_images: bool = True) -> List[dict]:
    """Read and check an MDETR-style grounding file (module docstring) into dataset dicts::

        {"file_name", "height", "width", "image_id" (the entry's id: one per image-caption pair),
         "caption", "tokens_positive_eval"?, "original_img_id"?, "sentence_id"?, "dataset_name"?,
         "annotations": [{"bbox", "bbox_mode": XYWH_ABS, "category_id" (contiguous), "iscrowd",
                          "tokens_positive": [[start, end], ...], "phrase_ids"?,
                          "positive_tokens"?: [text-tower positions]}],
         "num_positions"?: positions the caption takes (start- to end-of-text)}

    With a ``tokenizer`` (CLIP BPE; ``context_length`` defaults to its own) each annotation
    gets ``positive_tokens`` (start-of-text at 0; :func:`grounding_positive_map` makes the
    target matrix), and a caption longer than the context raises
    :class:`~regionclip_d2.grounding.tokens.PromptTooLongError` (``on_too_long="skip"``: the
    entry is dropped, counted and logged). ``drop_missing_images``: entries whose image file
    is missing are dropped (counted), as in ``register_coco_format``.
    """
    if on_too_long not in ("error", "skip"):
        raise ValueError(f"on_too_long={on_too_long!r}: use 'error' or 'skip'")
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"grounding annotation file {json_file!r} does not exist")
    data = _read_json(json_file)
    check_grounding_annotations(data, json_file, strict_spans)
    check_coco_annotations(data, json_file, image_root if drop_missing_images else None)
    cat_ids = sorted(c["id"] for c in data["categories"])
    contiguous = {c: i for i, c in enumerate(cat_ids)}
    names = {c["id"]: c["name"] for c in data["categories"]}
    by_image: Dict = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    length = None
    if tokenizer is not None:
        length = int(context_length or tokenizer.context_length)
    dicts, too_long = [], 0
    for im in data["images"]:
        d = {"file_name": os.path.join(image_root, im["file_name"]), "height": im["height"], "width": im["width"],
             "image_id": im["id"], "caption": im["caption"]}
        for key in IMAGE_KEYS:
            if key in im:
                d[key] = im[key]
        if "tokens_positive_eval" in im:
            d["tokens_positive_eval"] = [[list(s) for s in phrase] for phrase in im["tokens_positive_eval"]]
        tokenized = None
        if tokenizer is not None:
            tokenized = tokenize_with_offsets(tokenizer, im["caption"])
            try:
                tokenized.check_fits(length, f"{json_file}: the caption of image entry {im['id']!r}")
            except PromptTooLongError as e:
                if on_too_long == "error":
                    raise PromptTooLongError(f"{e}; or pass on_too_long='skip' to drop such entries") from None
                too_long += 1
                continue
            d["num_positions"] = tokenized.num_positions
        anns = []
        for a in by_image.get(im["id"], []):
            obj = {"bbox": [float(v) for v in a["bbox"]], "bbox_mode": BoxMode.XYWH_ABS,
                   "category_id": contiguous[a["category_id"]], "iscrowd": int(a.get("iscrowd", 0)),
                   "tokens_positive": [list(s) for s in a["tokens_positive"]]}
            if "phrase_ids" in a:
                obj["phrase_ids"] = a["phrase_ids"]
            if tokenized is not None:
                obj["positive_tokens"] = _positions(tokenized, obj["tokens_positive"])
            anns.append(obj)
        d["annotations"] = anns
        dicts.append(d)
    if too_long:
        logger.warning("%s: %d image entries with captions longer than the text context (%d) were dropped",
                       json_file, too_long, length)
    if dataset_name is not None:
        meta = MetadataCatalog.get(dataset_name)
        if meta.get("thing_classes") is None:
            meta.set(thing_classes=[names[c] for c in cat_ids])
        splits = {c["id"]: c.get("split") for c in data["categories"]}
        if meta.get("novel_classes") is None and any(v is not None for v in splits.values()):
            meta.set(novel_classes=[names[c] for c in cat_ids if splits[c] == "novel"])
    logger.info("loaded %d image-caption entries with %d boxes from %s", len(dicts),
                sum(len(d["annotations"]) for d in dicts), json_file)
    return dicts


def register_grounding_dataset(name: str, json_file: str, image_root: str, tokenizer=None, **kwargs) -> str:
    """Register an MDETR-style grounding file in detectron2's catalogs (replacing one of the
    same name): ``register_grounding_dataset("flickr_train", "final_flickr_separateGT_train.json",
    "flickr30k/images")``. The file is read when the data set is first used; ``kwargs`` go to
    :func:`load_grounding_json`. Metadata: ``grounding_file``, ``image_root``,
    ``evaluator_type="grounding"``, and once loaded ``thing_classes`` and, where the
    categories carry ``"split"``, ``novel_classes`` (the evaluator's novel / base rows)."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"grounding annotation file {json_file!r} for data set {name!r} does not exist")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image folder {image_root!r} for data set {name!r} does not exist")
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_grounding_json(json_file, image_root, name, tokenizer, **kwargs))
    MetadataCatalog.get(name).set(grounding_file=json_file, image_root=image_root, evaluator_type="grounding")
    return name


def detection_to_grounding(dataset_dicts: Sequence[dict], class_names: Sequence[str], tokenizer,
                           context_length: Optional[int] = None, keep_empty: bool = True) -> List[dict]:
    """Detection dataset dicts (``category_id`` = index into ``class_names``, as detectron2's
    loaders give) -> grounding dicts whose caption is the class prompt.

    The class list becomes prompts by :func:`~regionclip_d2.grounding.prompts.build_class_prompts`
    (one, or several chunks when it does not fit the context); each image gives one dict per
    prompt, holding the boxes of that prompt's classes with ``tokens_positive`` = their class
    name's span and ``positive_tokens``. Added keys: ``caption``, ``prompt_index``,
    ``class_ids`` (the prompt's global class indices, in order), ``num_positions``; each
    annotation keeps its global ``category_id``. ``keep_empty=False`` leaves out dicts of
    prompts with none of the image's classes (a prompt with no box still teaches which
    classes are absent).
    """
    prompts = build_class_prompts(class_names, tokenizer, context_length)
    tokenized = [tokenize_with_offsets(tokenizer, p.caption) for p in prompts]
    where = {}
    for k, p in enumerate(prompts):
        for j, c in enumerate(p.labels):
            where[c] = (k, j)
    out = []
    for d in dataset_dicts:
        per_prompt = [[] for _ in prompts]
        for a in d.get("annotations", []):
            c = a.get("category_id")
            if not _is_int(c) or c not in where:
                raise GroundingDataError(f"{d.get('file_name')!r}: an annotation has category_id {c!r}, not an index "
                                         f"into the {len(class_names)} class names: give the class list "
                                         "of the data set (its metadata's thing_classes)")
            k, j = where[c]
            obj = copy.deepcopy(a)
            span = list(prompts[k].char_spans[j])
            obj["tokens_positive"] = [span]
            obj["positive_tokens"] = _positions(tokenized[k], [span])
            per_prompt[k].append(obj)
        for k, p in enumerate(prompts):
            if not per_prompt[k] and not keep_empty:
                continue
            g = {key: v for key, v in d.items() if key != "annotations"}
            g.update(caption=p.caption, prompt_index=k, class_ids=list(p.labels), num_positions=p.num_positions,
                     annotations=per_prompt[k])
            out.append(g)
    return out


def grounding_positive_map(dataset_dict: dict, context_length: int, normalize: bool = False) -> torch.Tensor:
    """``[num_annotations, context_length]`` token targets of a dict with ``positive_tokens``
    (made by :func:`load_grounding_json` with a tokenizer, or :func:`detection_to_grounding`)."""
    anns = dataset_dict.get("annotations", [])
    out = torch.zeros(len(anns), context_length)
    for i, a in enumerate(anns):
        if "positive_tokens" not in a:
            raise ValueError(f"annotation {i} of {dataset_dict.get('file_name')!r} has no positive_tokens: load the "
                             "data with a tokenizer (load_grounding_json(..., tokenizer=...))")
        pos = a["positive_tokens"]
        if pos and (min(pos) < 0 or max(pos) >= context_length):
            raise ValueError(f"annotation {i}: token positions {pos} fall outside a context of {context_length}")
        out[i, pos] = 1.0
    if normalize:
        out = out / out.sum(dim=1, keepdim=True).clamp(min=1)
    return out


__all__ = ["GroundingDataError", "check_span", "check_grounding_annotations", "load_grounding_json",
           "register_grounding_dataset", "detection_to_grounding", "grounding_positive_map"]
