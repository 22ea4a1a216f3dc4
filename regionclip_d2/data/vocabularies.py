"""Builtin vocabularies and vocabulary files.

A vocabulary is an ordered list of class names. Builtins: ``coco`` (80), the COCO
open-vocabulary split of OVR-CNN (``coco_ovd_base`` 48, ``coco_ovd_novel`` 17,
``coco_ovd_all`` 65, in COCO category order) and ``lvis`` (1203, with frequencies).
"""
import json
import os
from typing import Dict, List, Optional

COCO_OVD_NOVEL = [
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard",
    "skateboard", "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors",
]
COCO_OVD_BASE = [
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird",
    "horse", "sheep", "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase",
    "frisbee", "skis", "kite", "surfboard", "bottle", "fork", "spoon", "bowl", "banana",
    "apple", "sandwich", "orange", "broccoli", "carrot", "pizza", "donut", "chair", "bed",
    "toilet", "tv", "laptop", "mouse", "remote", "microwave", "oven", "toaster",
    "refrigerator", "book", "clock", "vase", "toothbrush",
]


class VocabularyError(ValueError):
    pass


def coco_categories() -> List[dict]:
    """The 80 COCO thing categories (``id``, ``name``) in COCO order."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]


def lvis_categories() -> List[dict]:
    """The 1203 LVIS v1 categories (``id``, ``name``, ``synonyms``, ``frequency``)."""
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    return [{"id": c["id"], "name": c["name"], "synonyms": c["synonyms"],
             "frequency": c["frequency"]} for c in sorted(LVIS_CATEGORIES, key=lambda c: c["id"])]


def _coco_ovd(split: str) -> List[str]:
    keep = set(COCO_OVD_BASE) if split == "base" else set(COCO_OVD_NOVEL)
    if split == "all":
        keep |= set(COCO_OVD_BASE)
    return [c["name"] for c in coco_categories() if c["name"] in keep]


BUILTIN_VOCABULARIES = {
    "coco": lambda: [c["name"] for c in coco_categories()],
    "coco_ovd_base": lambda: _coco_ovd("base"),
    "coco_ovd_novel": lambda: _coco_ovd("novel"),
    "coco_ovd_all": lambda: _coco_ovd("all"),
    "lvis": lambda: [c["name"] for c in lvis_categories()],
}


def check_vocabulary(names, source: str = "vocabulary") -> List[str]:
    """Validate class names: a non-empty list of non-empty, distinct strings (returned
    with surrounding whitespace stripped)."""
    if isinstance(names, str):
        raise VocabularyError(f"{source}: expected a list of class names, got one string")
    try:
        names = list(names)
    except TypeError:
        raise VocabularyError(f"{source}: expected a list of class names, got {type(names).__name__}") from None
    not_str = [i for i, n in enumerate(names) if not isinstance(n, str)]
    if not_str:
        raise VocabularyError(f"{source}: class name(s) at position {not_str[:10]} are not strings "
                              f"(e.g. {str(names[not_str[0]])[:50]!r})")
    names = [n.strip() for n in names]
    if not names:
        raise VocabularyError(f"{source} is empty: give at least one class name")
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise VocabularyError(f"{source}: class name(s) at position {empty[:10]} are empty")
    seen, dups = set(), []
    for n in names:
        if n in seen and n not in dups:
            dups.append(n)
        seen.add(n)
    if dups:
        raise VocabularyError(f"{source} has duplicate class names {dups[:10]}: each class must "
                              "appear once (merge them or make the names distinct)")
    return names


def read_vocabulary_file(path: str) -> List[str]:
    """Class names from a text file (one per line; ``#`` comments and blank lines
    skipped) or a JSON file (a list of names, a list of ``{"name": ...}``, or a COCO
    json's ``categories``)."""
    if not os.path.isfile(path):
        raise VocabularyError(f"vocabulary file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8-sig") as f:  # a UTF-8 byte-order mark is not part of the first name
            text = f.read()
    except UnicodeDecodeError as e:
        raise VocabularyError(f"vocabulary file {path!r} is not UTF-8 text: {e}") from e
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise VocabularyError(f"vocabulary file {path!r} is not valid JSON: {e}") from e
        if isinstance(data, dict) and "categories" in data:
            data = data["categories"]
            if not isinstance(data, list) or not all(isinstance(c, dict) for c in data):
                raise VocabularyError(f"{path!r}: 'categories' must be a list of {{'id': ..., 'name': ...}}")
            ids = [c.get("id", 0) for c in data]
            if not all(isinstance(i, (int, float)) and not isinstance(i, bool) and i == i for i in ids):
                raise VocabularyError(f"{path!r}: category ids must be numbers (the classes are sorted by id)")
            data = [c for _, c in sorted(zip(ids, data), key=lambda x: x[0])]
        if not isinstance(data, list):
            raise VocabularyError(f"{path!r}: expected a JSON list of names or of {{'name': ...}}")
        names = []
        for i, item in enumerate(data):
            if isinstance(item, dict):
                if "name" not in item:
                    raise VocabularyError(f"{path!r}: entry {i} has no 'name'")
                item = item["name"]
            names.append(item)
    else:
        # one name per line (open() has turned \r\n and \r into \n); not str.splitlines(),
        # which would also split names at form feeds, U+2028 and other separators
        names = [ln.strip() for ln in text.split("\n")]
        names = [n for n in names if n and not n.startswith("#")]
    return check_vocabulary(names, f"vocabulary file {path!r}")


def load_vocabulary(spec) -> List[str]:
    """Class names from: a list of names, a builtin name (``coco``, ``coco_ovd_all``,
    ``lvis``, ...), a path to a .txt/.json file, or a comma-separated string."""
    if isinstance(spec, (list, tuple)):
        return check_vocabulary(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise VocabularyError("vocabulary is empty: give a builtin name "
                              f"({', '.join(BUILTIN_VOCABULARIES)}), a file or 'a,b,c'")
    spec = spec.strip()
    if spec in BUILTIN_VOCABULARIES:
        return BUILTIN_VOCABULARIES[spec]()
    if os.path.isfile(spec):
        return read_vocabulary_file(spec)
    if "," in spec:
        return check_vocabulary(spec.split(","), "custom vocabulary")
    if spec.endswith((".txt", ".json")):
        raise VocabularyError(f"vocabulary file {spec!r} does not exist")
    raise VocabularyError(f"unknown vocabulary {spec!r}: use one of {', '.join(BUILTIN_VOCABULARIES)}, "
                          "a .txt/.json file of names, or comma-separated names 'a,b,c'")


def prompt_name(name: str) -> str:
    """The text put into prompts for a class name (LVIS style ``traffic_light`` ->
    ``traffic light``; ``-other`` / ``-merged`` suffixes dropped as the official code does)."""
    return name.replace("-other", "").replace("-merged", "").replace("_", " ").strip()


def lvis_frequencies() -> Dict[str, str]:
    return {c["name"]: c["frequency"] for c in lvis_categories()}


def builtin_vocabulary_names() -> List[str]:
    return list(BUILTIN_VOCABULARIES)


def vocabulary_id(spec) -> Optional[str]:
    return spec if isinstance(spec, str) and spec in BUILTIN_VOCABULARIES else None
