"""Registering detection data sets: the open-vocabulary benchmarks and custom COCO files.

Builtin names (files under ``$DETECTRON2_DATASETS``, default ``datasets/``; make them with
``tools/prepare_ovd_data.py``):

- ``coco_2017_ovd_b_train``: COCO train2017, 48 base classes only;
- ``coco_2017_ovd_all_test``: COCO val2017, 65 classes (48 base + 17 novel);
- ``coco_2017_ovd_t_test``: COCO val2017, 17 novel classes;
- ``lvis_v1_train_base``: LVIS v1 train without rare-class annotations (866 base classes);
- ``lvis_v1_val`` (registered by detectron2).
"""
import json
import logging
import math
import os
from collections import Counter
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .vocabularies import COCO_OVD_NOVEL

logger = logging.getLogger(__name__)

COCO_OVD_FILES = {
    "coco_2017_ovd_b_train": ("coco/train2017", "coco/annotations/ovd_ins_train2017_b.json"),
    "coco_2017_ovd_all_test": ("coco/val2017", "coco/annotations/ovd_ins_val2017_all.json"),
    "coco_2017_ovd_t_test": ("coco/val2017", "coco/annotations/ovd_ins_val2017_t.json"),
}
LVIS_OVD_FILES = {"lvis_v1_train_base": ("coco/", "lvis/lvis_v1_train_base.json")}
HOW_TO = ("get COCO 2017 / LVIS v1 as datasets/README.md describes, then run "
          "tools/prepare_ovd_data.py --coco-dir datasets/coco --lvis-dir datasets/lvis")


def datasets_root() -> str:
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


class AnnotationError(ValueError):
    pass


def _is_id(v) -> bool:
    """A usable COCO id: an integer (or an integral float) or a string; not bool/None/list."""
    if isinstance(v, bool):
        return False
    if isinstance(v, float):
        return math.isfinite(v) and v.is_integer()
    return isinstance(v, (int, str))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_ids(items, what: str, json_file: str) -> set:
    """The ids of ``images`` / ``categories``: each valid, distinct, all numbers or all strings
    (detectron2 sorts them)."""
    ids = set()
    for i, x in enumerate(items):
        if not isinstance(x, dict):
            raise AnnotationError(f"{json_file}: {what}[{i}] is not an object: {str(x)[:100]}")
        if "id" not in x:
            raise AnnotationError(f"{json_file}: {what}[{i}] lacks 'id'")
        if not _is_id(x["id"]):
            raise AnnotationError(f"{json_file}: {what}[{i}] has id {str(x['id'])[:100]}: ids are integers or strings")
        if x["id"] in ids:
            raise AnnotationError(f"{json_file}: {what}[{i}] repeats id {x['id']!r}: each of the {what} needs its "
                                  "own id")
        ids.add(x["id"])
    if len({isinstance(v, str) for v in ids}) > 1:
        raise AnnotationError(f"{json_file}: {what} ids mix numbers and strings: use one kind")
    return ids


def _check_structure(data, json_file: str):
    """The top-level lists, images and categories (ids, names, sizes); raises AnnotationError."""
    if not isinstance(data, dict):
        raise AnnotationError(f"{json_file}: not a JSON object (is this a COCO instances file?)")
    for key in ("images", "annotations", "categories"):
        if key not in data or not isinstance(data[key], list):
            raise AnnotationError(f"{json_file}: no '{key}' list (is this a COCO instances file?)")
    _check_ids(data["categories"], "categories", json_file)
    for i, c in enumerate(data["categories"]):
        if not isinstance(c.get("name"), str):
            raise AnnotationError(f"{json_file}: categories[{i}] lacks 'id' or 'name' (a string): {str(c)[:100]}")
    _check_ids(data["images"], "images", json_file)
    for i, im in enumerate(data["images"]):
        for key in ("file_name", "height", "width"):
            if key not in im:
                raise AnnotationError(f"{json_file}: images[{i}] (id {im['id']!r}) lacks '{key}'")
        if not isinstance(im["file_name"], str) or not im["file_name"]:
            raise AnnotationError(f"{json_file}: images[{i}] (id {im['id']!r}) has file_name "
                                  f"{str(im['file_name'])[:100]!r}: expected a non-empty string")
        for key in ("height", "width"):
            v = im[key]
            if not _is_number(v) or not math.isfinite(v) or v <= 0:
                raise AnnotationError(f"{json_file}: images[{i}] (id {im['id']!r}) has {key} {str(v)[:100]}: "
                                      "expected a positive number")
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise AnnotationError(f"{json_file}: annotations[{i}] is not an object: {str(a)[:100]}")


def check_coco_annotations(data: Dict, json_file: str, image_root: Optional[str] = None,
                           vocabulary: Optional[List[str]] = None):
    """Validate and repair a COCO-format dict in place; return counts of what was done.

    Errors (:class:`AnnotationError`, naming the file and the entry): missing
    ``images``/``annotations``/``categories`` lists, an entry that is not an object, an
    image without id/file_name/height/width (a non-empty string, positive numbers), a
    category without id/name, ids that are not integers or strings or that repeat (images,
    categories), an annotation without image_id/category_id/bbox, a bbox that is not 4
    numbers, an unknown category id or image id. Handled and counted: annotation ids that
    are missing, not positive integers or duplicated (pycocotools never matches id 0: all
    ids are renumbered from 1), boxes with NaN/infinite values or of zero or negative size
    (dropped), boxes partly outside the image (clipped), boxes wholly outside (dropped),
    images missing on disk (dropped with their annotations, if ``image_root`` is given),
    categories absent from ``vocabulary`` (error).
    """
    _check_structure(data, json_file)
    stats = Counter()
    cats = {c["id"]: c["name"] for c in data["categories"]}
    if vocabulary is not None:
        missing = [n for n in cats.values() if n not in set(vocabulary)]
        if missing:
            raise AnnotationError(f"{json_file}: categories {missing[:10]} are not in the vocabulary: add them to "
                                  "the vocabulary or remove them from the annotations")
    images = {}
    kept_images = []
    declared = {im["id"] for im in data["images"]}
    for im in data["images"]:
        if image_root is not None and not os.path.isfile(os.path.join(image_root, im["file_name"])):
            stats["images missing on disk (dropped)"] += 1
            continue
        images[im["id"]] = im
        kept_images.append(im)
    data["images"] = kept_images
    kept = []
    ann_ids = [a.get("id") for a in data["annotations"]]
    renumber = not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ann_ids) \
        or len(set(ann_ids)) < len(ann_ids)
    for i, a in enumerate(data["annotations"]):
        where = f"annotations[{i}] (id {str(a.get('id'))[:50]})"
        for key in ("image_id", "category_id", "bbox"):
            if key not in a:
                raise AnnotationError(f"{json_file}: {where} lacks '{key}'")
        if not _is_id(a["category_id"]) or a["category_id"] not in cats:
            raise AnnotationError(f"{json_file}: {where} has category_id {str(a['category_id'])[:100]}, which is "
                                  "not in 'categories'")
        if not _is_id(a["image_id"]) or a["image_id"] not in declared:
            raise AnnotationError(f"{json_file}: {where} refers to image_id {str(a['image_id'])[:100]}, which is "
                                  "not in 'images'")
        im = images.get(a["image_id"])
        if im is None:
            stats["annotations of dropped images"] += 1
            continue
        box = a["bbox"]
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise AnnotationError(f"{json_file}: {where} has bbox {str(box)[:100]}: expected [x, y, width, height] "
                                  "(4 numbers)")
        x, y, w, h = [float(v) for v in box]
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            stats["boxes with NaN or infinite values (dropped)"] += 1
            continue
        if w <= 0 or h <= 0:
            stats["boxes of zero or negative size (dropped)"] += 1
            continue
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(float(im["width"]), x + w), min(float(im["height"]), y + h)
        if not x1 > x0 or not y1 > y0:
            stats["boxes outside the image (dropped)"] += 1
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            stats["boxes partly outside the image (clipped)"] += 1
            a["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        a.setdefault("iscrowd", 0)
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
        kept.append(a)
    if renumber:
        stats["annotation ids renumbered from 1 (missing, not positive integers, or duplicates)"] += len(kept)
        for k, a in enumerate(kept, start=1):
            a["id"] = k
    data["annotations"] = kept
    for what, n in stats.items():
        logger.warning("%s: %d %s", json_file, n, what)
    return dict(stats)


def _read_json(json_file):
    try:
        with open(json_file, encoding="utf-8-sig") as f:
            return json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise AnnotationError(f"{json_file}: not valid JSON ({str(e)[:200]})") from e


def _load_checked(json_file, image_root, name, vocabulary=None, category_split=None):
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"data set {name!r}: annotation file {json_file} does not exist; {HOW_TO}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"data set {name!r}: image folder {image_root} does not exist; {HOW_TO}")
    data = _read_json(json_file)
    if category_split is not None:
        _check_structure(data, json_file)
        keep = {c["id"] for c in data["categories"] if c.get("split") == category_split}
        if not keep:
            raise AnnotationError(f"{json_file}: no category is marked \"split\": \"{category_split}\"")
        data["categories"] = [c for c in data["categories"] if c["id"] in keep]
        dropped = [a for a in data["annotations"] if _is_id(a.get("category_id")) and a["category_id"] not in keep]
        if dropped:
            logger.warning("%s: %d annotation(s) of categories outside split %r dropped", json_file, len(dropped),
                           category_split)
        data["annotations"] = [a for a in data["annotations"] if not _is_id(a.get("category_id"))
                               or a["category_id"] in keep]
    stats = check_coco_annotations(data, json_file, image_root, vocabulary)
    if not stats and category_split is None:
        return load_coco_json(json_file, image_root, name)
    import tempfile

    fd, fixed = tempfile.mkstemp(suffix=".json", prefix=f"{name}_checked_")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        return load_coco_json(fixed, image_root, name)  # reads the file whole: it can go afterwards
    finally:
        os.remove(fixed)


def register_coco_format(name: str, json_file: str, image_root: str, novel_classes: Optional[List[str]] = None,
                         category_split: Optional[str] = None, **metadata):
    """Register a COCO-format detection data set in one line.

    ``register_coco_format("my_val", "ann.json", "images/")``, then ``DATASETS.TEST ("my_val",)``.
    Annotations are checked (see :func:`check_coco_annotations`). Classes marked
    ``"split": "novel"`` in the file's categories (or given as ``novel_classes``) are
    reported separately by the evaluator (novel / base / all AP50). ``category_split="base"``
    keeps only the categories marked ``"split": "base"`` (a training split whose file lists
    novel categories without boxes), so class indices follow the base vocabulary.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"annotation file {json_file!r} for data set {name!r} does not exist")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image folder {image_root!r} for data set {name!r} does not exist")
    if novel_classes is None:
        data = _read_json(json_file)
        _check_structure(data, json_file)  # fails early, at registration, on a malformed file
        cats = data["categories"]
        if any("split" in c for c in cats):
            novel_classes = [c["name"] for c in cats if c.get("split") == "novel"]
    _register(name, json_file, image_root, novel_classes, metadata, category_split)
    return name


def _register(name, json_file, image_root, novel_classes, metadata, category_split=None):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: _load_checked(json_file, image_root, name, category_split=category_split))
    # no "json_file" in the metadata: the COCO evaluator then builds its ground truth from
    # the checked records, so evaluation sees exactly what was loaded
    meta = dict(annotation_file=json_file, image_root=image_root, evaluator_type="coco", **metadata)
    if novel_classes is not None:
        meta["novel_classes"] = list(novel_classes)
    MetadataCatalog.get(name).set(**meta)


def register_ovd_builtins(root: Optional[str] = None):
    """Register the builtin open-vocabulary data set names (files are read only when used)."""
    root = root or datasets_root()
    for name, (images, ann) in COCO_OVD_FILES.items():
        if name not in DatasetCatalog.list():
            _register(name, os.path.join(root, ann), os.path.join(root, images),
                      None if name.endswith("_b_train") else list(COCO_OVD_NOVEL), {})
    from detectron2.data.datasets.lvis import get_lvis_instances_meta, load_lvis_json

    for name, (images, ann) in LVIS_OVD_FILES.items():
        if name in DatasetCatalog.list():
            continue
        json_file, image_root = os.path.join(root, ann), os.path.join(root, images)

        def load(json_file=json_file, image_root=image_root, name=name):
            if not os.path.isfile(json_file):
                raise FileNotFoundError(f"data set {name!r}: annotation file {json_file} does not exist; {HOW_TO}")
            return load_lvis_json(json_file, image_root, name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="lvis",
                                      **get_lvis_instances_meta("lvis_v1"))
