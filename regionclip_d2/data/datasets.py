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
import os
from collections import Counter
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode

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


def check_coco_annotations(data: Dict, json_file: str, image_root: Optional[str] = None,
                           vocabulary: Optional[List[str]] = None):
    """Validate and repair a COCO-format dict in place; return counts of what was done.

    Errors (naming the file and the entry): missing ``images``/``annotations``/``categories``,
    an image without id/file_name/height/width, an annotation without image_id/category_id/bbox,
    an unknown category id or image id. Handled and counted: annotation id 0 or duplicate ids
    (pycocotools never matches id 0: all ids are renumbered from 1), boxes of zero or negative
    size (dropped), boxes partly outside the image (clipped), boxes wholly outside (dropped),
    images missing on disk (dropped with their annotations, if ``image_root`` is given),
    categories absent from ``vocabulary`` (error).
    """
    for key in ("images", "annotations", "categories"):
        if key not in data or not isinstance(data[key], list):
            raise AnnotationError(f"{json_file}: no '{key}' list (is this a COCO instances file?)")
    stats = Counter()
    cats = {}
    for i, c in enumerate(data["categories"]):
        if "id" not in c or "name" not in c:
            raise AnnotationError(f"{json_file}: categories[{i}] lacks 'id' or 'name': {c}")
        cats[c["id"]] = c["name"]
    if vocabulary is not None:
        missing = [n for n in cats.values() if n not in set(vocabulary)]
        if missing:
            raise AnnotationError(f"{json_file}: categories {missing[:10]} are not in the vocabulary: add them to "
                                  "the vocabulary or remove them from the annotations")
    images = {}
    kept_images = []
    for i, im in enumerate(data["images"]):
        for key in ("id", "file_name", "height", "width"):
            if key not in im:
                raise AnnotationError(f"{json_file}: images[{i}] (id {im.get('id')}) lacks '{key}'")
        if image_root is not None and not os.path.isfile(os.path.join(image_root, im["file_name"])):
            stats["images missing on disk (dropped)"] += 1
            continue
        images[im["id"]] = im
        kept_images.append(im)
    data["images"] = kept_images
    kept = []
    ids = Counter(a.get("id") for a in data["annotations"])
    renumber = any(a.get("id") in (0, None) for a in data["annotations"]) or any(v > 1 for v in ids.values())
    for i, a in enumerate(data["annotations"]):
        for key in ("image_id", "category_id", "bbox"):
            if key not in a:
                raise AnnotationError(f"{json_file}: annotations[{i}] (id {a.get('id')}) lacks '{key}'")
        if a["category_id"] not in cats:
            raise AnnotationError(f"{json_file}: annotations[{i}] (id {a.get('id')}) has category_id "
                                  f"{a['category_id']}, which is not in 'categories'")
        im = images.get(a["image_id"])
        if im is None:
            if any(x["id"] == a["image_id"] for x in data["images"]) or image_root is not None:
                stats["annotations of dropped images"] += 1
                continue
            raise AnnotationError(f"{json_file}: annotations[{i}] refers to image_id {a['image_id']}, "
                                  "which is not in 'images'")
        x, y, w, h = [float(v) for v in a["bbox"]]
        if w <= 0 or h <= 0:
            stats["boxes of zero or negative size (dropped)"] += 1
            continue
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(float(im["width"]), x + w), min(float(im["height"]), y + h)
        if x1 <= x0 or y1 <= y0:
            stats["boxes outside the image (dropped)"] += 1
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            stats["boxes partly outside the image (clipped)"] += 1
            a["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        a.setdefault("iscrowd", 0)
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
        kept.append(a)
    if renumber:
        stats["annotation ids renumbered from 1 (id 0 or duplicates found)"] += len(kept)
        for k, a in enumerate(kept, start=1):
            a["id"] = k
    data["annotations"] = kept
    for what, n in stats.items():
        logger.warning("%s: %d %s", json_file, n, what)
    return dict(stats)


def _load_checked(json_file, image_root, name, vocabulary=None, category_split=None):
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"data set {name!r}: annotation file {json_file} does not exist; {HOW_TO}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"data set {name!r}: image folder {image_root} does not exist; {HOW_TO}")
    with open(json_file) as f:
        data = json.load(f)
    if category_split is not None:
        keep = {c["id"] for c in data.get("categories", []) if c.get("split") == category_split}
        if not keep:
            raise AnnotationError(f"{json_file}: no category is marked \"split\": \"{category_split}\"")
        data["categories"] = [c for c in data["categories"] if c["id"] in keep]
        dropped = [a for a in data.get("annotations", []) if a.get("category_id") not in keep]
        if dropped:
            logger.warning("%s: %d annotation(s) of categories outside split %r dropped", json_file, len(dropped),
                           category_split)
        data["annotations"] = [a for a in data.get("annotations", []) if a.get("category_id") in keep]
    stats = check_coco_annotations(data, json_file, image_root, vocabulary)
    if stats or category_split is not None:
        import tempfile

        fd, fixed = tempfile.mkstemp(suffix=".json", prefix=f"{name}_checked_")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        json_file = fixed
    return load_coco_json(json_file, image_root, name)


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
        with open(json_file) as f:
            cats = json.load(f).get("categories", [])
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
