"""Grounding data through detectron2's data loader: each image-caption pair's phrases and
the boxes they name, ready for the grounding head.

:class:`GroundingDatasetMapper` is the project's dataset mapper (resize, flip, images read
as everywhere else) plus, for a dict that carries a ``caption`` (grounding data,
:func:`~regionclip_d2.grounding.data.load_grounding_json`, or detection data turned into it
by :func:`~regionclip_d2.grounding.data.detection_to_grounding`):

* ``dataset_dict["grounding"] = {"caption", "phrases", "ignore"}``: the caption (after a
  horizontal flip with "left" and "right" swapped, so "a star to the left of a moon" stays
  true), its grounded phrases as lists of ``[start, end)`` character spans (the distinct
  ``tokens_positive`` of its annotations, in the order of their first character: the order
  of :func:`~regionclip_d2.evaluation.grounding_recall.phrase_targets`, so phrase ``i`` of
  the model's output is phrase ``i`` of the evaluation) and the spans a loss leaves out
  (``tokens_withheld``: named in the caption, boxes withheld);
* in training, ``instances.gt_phrases``: each box's phrase index, and ``gt_classes`` 0 for
  every box (the class of a caption's box is its phrase; background stays ``NUM_CLASSES``).

Dicts without a caption go through unchanged (detection data: the class prompt). The model
turns ``grounding`` into a prompt with its own tokenizer
(:func:`~regionclip_d2.grounding.prompts.grounded_prompt`).
"""
import copy
import re
from typing import Dict, List, Sequence, Tuple

import torch

from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from ..data.mappers import RegionCLIPDatasetMapper

__all__ = ["GroundingDatasetMapper", "grounding_phrases", "swap_left_right"]

_SIDES = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}


def grounding_phrases(dataset_dict: dict) -> Tuple[List[List[List[int]]], Dict[tuple, int]]:
    """The grounded phrases of a grounding dict: the distinct ``tokens_positive`` of its
    annotations sorted by their first span (each a list of ``[start, end)``), and a map
    from a ``tokens_positive`` (as a tuple of tuples) to its phrase index."""
    keys = set()
    for a in dataset_dict.get("annotations", []):
        spans = tuple(tuple(int(v) for v in s) for s in a.get("tokens_positive", []))
        if spans:
            keys.add(spans)
    ordered = sorted(keys, key=lambda s: s[0])
    return [[list(s) for s in k] for k in ordered], {k: i for i, k in enumerate(ordered)}


def swap_left_right(caption: str, span_lists: Sequence[Sequence[Sequence[int]]]
                    ) -> Tuple[str, List[List[List[int]]]]:
    """The caption of a horizontally flipped image: "left" and "right" swapped (whole words,
    case kept), and each list of ``[start, end)`` spans moved to the new characters."""
    shift = [0] * (len(caption) + 1)  # new offset of each old character boundary
    out, pos, delta = [], 0, 0
    for m in _SIDES.finditer(caption):
        a, b = m.span()
        for i in range(pos, a + 1):
            shift[i] = i + delta
        new = _SWAP[m.group(0)]
        out += [caption[pos:a], new]
        for i in range(a + 1, b):  # boundaries inside the word: clamp to its new end
            shift[i] = min(i + delta, a + delta + len(new))
        delta += len(new) - (b - a)
        pos = b
    for i in range(pos, len(caption) + 1):
        shift[i] = i + delta
    out.append(caption[pos:])
    return "".join(out), [[[shift[a], shift[b]] for a, b in spans] for spans in span_lists]


class GroundingDatasetMapper(RegionCLIPDatasetMapper):
    """The detector's mapper, with each caption's phrases (module docstring)."""

    def __call__(self, dataset_dict):
        if "caption" not in dataset_dict:
            return super().__call__(dataset_dict)
        d = copy.deepcopy(dataset_dict)
        phrases, index = grounding_phrases(d)
        for a in d.get("annotations", []):
            key = tuple(tuple(int(v) for v in s) for s in a.get("tokens_positive", []))
            a["phrase_index"] = index.get(key, -1)
            a["category_id"] = 0
        d["annotations"] = [a for a in d.get("annotations", []) if a["phrase_index"] >= 0]
        d["grounding"] = {"caption": d["caption"], "phrases": phrases,
                          "ignore": [list(s) for s in d.get("tokens_withheld", [])]}
        return super().__call__(d)

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        if "grounding" not in dataset_dict:
            return super()._transform_annotations(dataset_dict, transforms, image_shape)
        flips = sum(isinstance(t, T.HFlipTransform) for t in transforms.transforms)
        if flips % 2:
            g = dataset_dict["grounding"]
            caption, moved = swap_left_right(g["caption"], g["phrases"] + [g["ignore"]])
            dataset_dict["grounding"] = {"caption": caption, "phrases": moved[:-1], "ignore": moved[-1]}
        annos = [utils.transform_instance_annotations(obj, transforms, image_shape)
                 for obj in dataset_dict.pop("annotations") if obj.get("iscrowd", 0) == 0]
        instances = utils.annotations_to_instances(annos, image_shape)
        instances.gt_phrases = torch.tensor([a["phrase_index"] for a in annos], dtype=torch.long)
        if self.recompute_boxes:
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
