"""A seeded synthetic open-vocabulary detection world: shapes on textured backgrounds.

Each image (``image_size`` x ``image_size`` px, RGB) shows 1..``max_objects`` coloured
shapes (``circle``, ``star``, ``moon``, ...) of random size, rotation and aspect, placed with
mild occlusion on a noisy textured background with faint clutter lines. Every image
comes with template captions that mention some of its objects with counts, colours,
sizes and spatial relations ("two red stars next to a blue ring", "a photo of a moon").

The categories are split into *base* and *novel*. Training annotations never contain a
novel box (those annotations are removed from the train JSON), but novel shapes are
drawn in training images and named in training captions, exactly the setting of
open-vocabulary detection: boxes for base classes, only image-level text for novel ones.

Lessons from the feasibility study (``shared/docs/SYNTHETIC.md``) are defaults here:
colour is a shortcut, so only ``colour_prob`` = 50% of captions name colours; about 45%
of the images show a single object; objects are at least 20% of the image side.

The parts live in their own modules (their public names are re-exported here): ``shapes``
(geometry, colours, default categories), ``world_config`` (``WorldConfig``, validation),
``rendering`` (backgrounds, placement, ``render_image``) and ``captions`` (``make_caption``).
This module generates a world and writes it to disk, and reads it back.

Outputs, all ordinary files the regular loaders read (``generate_world``)::

    <out>/world.json                          description of the world (see ``world_description``)
    <out>/{train,val,test}/<split>_000000.png images
    <out>/annotations/instances_<split>.json  COCO instances (bbox XYWH in pixels)
    <out>/annotations/captions_<split>.jsonl  {"file_name", "image_id", "caption"} per line
    <out>/annotations/grounding_<split>.json  the captions' phrases and the boxes they name, in
                                              MDETR's grounding format (see ``grounding_json``)

Only numpy and PIL are used; generation is deterministic given the seed (each image has its
own random stream derived from ``(seed, split, index)``, so results do not depend on the
number of worker processes).
"""
import json
import os
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

from .captions import PLURALS, make_caption, make_grounded_caption
from .rendering import DrawnObject, render_image
from .shapes import COLORS, DEFAULT_BASE, DEFAULT_CATEGORIES, DEFAULT_NOVEL, SHAPES
from .world_config import RENDER_REVISION, WORLD_FORMAT_VERSION, WorldConfig, WorldConfigError

__all__ = [
    # re-exported from shapes, world_config, rendering, captions
    "COLORS", "DEFAULT_BASE", "DEFAULT_CATEGORIES", "DEFAULT_NOVEL", "SHAPES", "RENDER_REVISION",
    "WORLD_FORMAT_VERSION", "WorldConfig", "WorldConfigError", "DrawnObject", "render_image", "PLURALS",
    "make_caption",
    # defined here
    "SPLITS", "image_rng", "file_name", "generate_sample", "world_paths", "categories_json", "generate_split",
    "grounding_json", "make_grounded_caption",
    "world_description", "generate_world", "load_world", "check_same_world", "read_captions",
]

SPLITS = ("train", "val", "test")

# ---------------------------------------------------------------------------------------
# Whole data set
# ---------------------------------------------------------------------------------------


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of image ``index`` of ``split`` (independent of other images)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS.index(split), int(index)]))


def file_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.png"


def generate_sample(cfg: WorldConfig, split: str, index: int, keep_masks: bool = False, grounded: bool = False):
    """Image ``index`` of ``split``: (image ``[S, S, 3]`` uint8, objects, captions); with
    ``grounded`` also each caption's phrases (``GroundedPhrase`` lists: the objects each names)."""
    rng = image_rng(cfg.seed, split, index)
    image, objects = render_image(cfg, rng, keep_masks=keep_masks)
    made = [make_grounded_caption(objects, cfg, rng) for _ in range(cfg.captions_per_image)]
    captions = [c for c, _ in made]
    if grounded:
        return image, objects, captions, [p for _, p in made]
    return image, objects, captions


def _render_and_save(args):
    cfg, split, index, image_dir = args
    image, objects, captions, phrases = generate_sample(cfg, split, index, grounded=True)
    # lossless; Huffman-only deflate: noisy pixels barely compress, this is 1.5x faster and smaller
    Image.fromarray(image).save(os.path.join(image_dir, file_name(split, index)), compress_level=1,
                                compress_type=2)
    return index, [(o.shape, o.color, o.bbox, o.area) for o in objects], captions, phrases


def _paths(output_dir: str, split: str) -> Dict[str, str]:
    return {"images": os.path.join(output_dir, split),
            "instances": os.path.join(output_dir, "annotations", f"instances_{split}.json"),
            "captions": os.path.join(output_dir, "annotations", f"captions_{split}.jsonl"),
            "grounding": os.path.join(output_dir, "annotations", f"grounding_{split}.json")}


def world_paths(world_dir: str, split: str) -> Dict[str, str]:
    """Absolute paths of a split: ``images`` (folder), ``instances`` (COCO JSON), ``captions``
    (JSONL), ``grounding`` (MDETR-style grounding JSON; worlds written before it existed lack it)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {SPLITS}")
    return _paths(os.path.abspath(world_dir), split)


def categories_json(cfg: WorldConfig) -> List[dict]:
    """COCO ``categories``: ids 1..C in ``cfg.categories`` order, with ``split`` base/novel."""
    return [{"id": i + 1, "name": c, "supercategory": "shape",
             "split": "novel" if c in cfg.novel else "base"} for i, c in enumerate(cfg.categories)]


def generate_split(cfg: WorldConfig, output_dir: str, split: str, num_images: int, workers: int = 1,
                   progress: bool = False) -> dict:
    """Render ``num_images`` images of ``split`` and write the images, the COCO JSON, the
    captions JSONL and the grounding JSON (:func:`grounding_json`). Novel-category annotations
    are left out of the ``train`` JSONs.

    Returns counts: ``{"images", "annotations", "novel_annotations_removed", "captions",
    "grounding_annotations"}``.
    """
    if num_images < 0:
        raise WorldConfigError(f"num_images={num_images} for split {split!r} must be >= 0")
    paths = _paths(output_dir, split)
    os.makedirs(paths["images"], exist_ok=True)
    os.makedirs(os.path.dirname(paths["instances"]), exist_ok=True)
    jobs = [(cfg, split, i, paths["images"]) for i in range(num_images)]
    if workers > 1 and num_images > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as ex:
            results = ex.map(_render_and_save, jobs, chunksize=64)
            results = list(_progress(results, num_images, split, progress))
    else:
        results = [_render_and_save(j) for j in _progress(jobs, num_images, split, progress)]
    cat_ids = {c: i + 1 for i, c in enumerate(cfg.categories)}
    images, annotations, caption_lines, removed = [], [], [], 0
    for index, objects, captions, _ in results:
        image_id = index + 1
        name = file_name(split, index)
        images.append({"id": image_id, "file_name": name, "height": cfg.image_size, "width": cfg.image_size})
        for shape, color, bbox, area in objects:
            if split == "train" and shape in cfg.novel:
                removed += 1
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": cat_ids[shape], "bbox": [float(v) for v in bbox],
                                "area": float(area), "iscrowd": 0, "color": color})
        caption_lines.extend({"file_name": name, "image_id": image_id, "caption": c} for c in captions)
    coco = {"info": {"description": f"synthetic open-vocabulary shapes world, split {split}",
                     "version": str(WORLD_FORMAT_VERSION), "world_fingerprint": cfg.fingerprint()},
            "licenses": [], "images": images, "annotations": annotations,
            "categories": categories_json(cfg)}
    with open(paths["instances"], "w") as f:
        json.dump(coco, f)
    with open(paths["captions"], "w") as f:
        for line in caption_lines:
            f.write(json.dumps(line) + "\n")
    grounding = grounding_json(cfg, split, results)
    with open(paths["grounding"], "w") as f:
        json.dump(grounding, f)
    return {"images": len(images), "annotations": len(annotations), "novel_annotations_removed": removed,
            "captions": len(caption_lines), "grounding_annotations": len(grounding["annotations"])}


def grounding_json(cfg: WorldConfig, split: str, results) -> dict:
    """The grounding annotations of a split in MDETR's format (read by
    :func:`regionclip_d2.grounding.data.load_grounding_json`): one image entry per caption
    (``caption``, ``original_img_id`` = the COCO image id, ``sentence_id``,
    ``tokens_positive_eval``: the spans of the phrases that have boxes, in order), one
    annotation per (phrase, object it names): the object's box, its category (the COCO
    file's ids) and colour, ``tokens_positive`` = the span of the whole phrase ("two red
    stars", "a small moon"), ``phrase_ids`` = the phrase's index in ``tokens_positive_eval``.

    In ``train``, as in the COCO file, objects of novel shapes get no annotation; the spans
    of phrases naming them are listed in the entry's ``tokens_withheld`` (named in the
    caption, boxes withheld), so a grounding loss can leave those tokens out.
    ``results``: ``(index, [(shape, colour, bbox, area)], captions, phrases)`` per image.
    """
    cat_ids = {c: i + 1 for i, c in enumerate(cfg.categories)}
    entries, annotations = [], []
    for index, objects, captions, phrases in results:
        for k, (caption, grounded) in enumerate(zip(captions, phrases)):
            entry = {"id": len(entries) + 1, "file_name": file_name(split, index), "height": cfg.image_size,
                     "width": cfg.image_size, "caption": caption, "original_img_id": index + 1, "sentence_id": k,
                     "dataset_name": "synthetic_world", "tokens_positive_eval": []}
            withheld = []
            for phrase in grounded:
                span = [phrase.start, phrase.end]
                members = [m for m in phrase.members if not (split == "train" and objects[m][0] in cfg.novel)]
                if not members:
                    withheld.append(span)
                    continue
                phrase_id = len(entry["tokens_positive_eval"])
                entry["tokens_positive_eval"].append([span])
                for m in members:
                    shape, color, bbox, area = objects[m]
                    annotations.append({"id": len(annotations) + 1, "image_id": entry["id"],
                                        "category_id": cat_ids[shape], "bbox": [float(v) for v in bbox],
                                        "area": float(area), "iscrowd": 0, "color": color,
                                        "tokens_positive": [span], "phrase_ids": phrase_id})
            if split == "train":
                entry["tokens_withheld"] = withheld
            entries.append(entry)
    return {"info": {"description": f"synthetic open-vocabulary shapes world, split {split}: phrase grounding "
                                    "(MDETR format)",
                     "version": str(WORLD_FORMAT_VERSION), "world_fingerprint": cfg.fingerprint()},
            "licenses": [], "images": entries, "annotations": annotations, "categories": categories_json(cfg)}


def _progress(it, total, split, enabled):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=f"{split} images", unit="img")


def world_description(cfg: WorldConfig, counts: Dict[str, dict]) -> dict:
    """The content of ``world.json``: parameters, categories, colours, counts, file paths."""
    return {
        "format_version": WORLD_FORMAT_VERSION,
        "generator": "regionclip_d2.synthetic.world",
        "render_revision": RENDER_REVISION,
        "fingerprint": cfg.fingerprint(),
        "seed": cfg.seed,
        "image_size": cfg.image_size,
        "categories": categories_json(cfg),
        "base": list(cfg.base),
        "novel": list(cfg.novel),
        "colors": {k: list(v) for k, v in cfg.colors.items()},
        "counts": counts,
        "params": cfg.to_dict(),
        "files": {split: _paths("", split) for split in counts},  # relative to the world folder
    }


def generate_world(output_dir: str, num_train: int = 2000, num_val: int = 300, num_test: int = 300,
                   workers: int = 1, progress: bool = False, config: Optional[WorldConfig] = None,
                   **params) -> dict:
    """Generate a whole world under ``output_dir`` (see the module docstring for the layout).

    Args:
        output_dir: folder (created); existing files of the same names are overwritten.
        num_train, num_val, num_test: images per split.
        workers: processes rendering images (the output does not depend on it).
        progress: show tqdm progress bars.
        config: a ready ``WorldConfig`` (else one is built from ``params``).
        **params: ``WorldConfig`` fields (``image_size``, ``max_objects``, ``seed``, ``novel``, ...).

    Returns:
        the ``world.json`` content (dict).
    """
    if config is not None and params:
        raise TypeError(f"give either config= or WorldConfig fields ({sorted(params)}), not both")
    cfg = config if config is not None else WorldConfig(**params)
    os.makedirs(output_dir, exist_ok=True)
    counts = {}
    for split, n in (("train", num_train), ("val", num_val), ("test", num_test)):
        counts[split] = generate_split(cfg, output_dir, split, n, workers=workers, progress=progress)
    desc = world_description(cfg, counts)
    with open(os.path.join(output_dir, "world.json"), "w") as f:
        json.dump(desc, f, indent=1)
    return desc


def load_world(world_dir: str) -> dict:
    """Read ``<world_dir>/world.json`` (raises a clear error when the folder is no world)."""
    path = os.path.join(world_dir, "world.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: {world_dir!r} is not a synthetic world; create one with "
            f"`python tools/make_synthetic_ovd.py --output-dir {world_dir}`")
    with open(path) as f:
        world = json.load(f)
    if world.get("format_version") != WORLD_FORMAT_VERSION:
        raise ValueError(f"{path} has format version {world.get('format_version')!r}, this code reads "
                         f"{WORLD_FORMAT_VERSION}: regenerate the world")
    return world


def check_same_world(expected_fingerprint: str, world_dir: str):
    """Raise when ``world_dir`` is not the world a later stage was built from."""
    got = load_world(world_dir)["fingerprint"]
    if got != expected_fingerprint:
        raise ValueError(f"world mismatch: {world_dir!r} has fingerprint {got}, the inputs were made from "
                         f"world {expected_fingerprint}; regenerate or point to the matching world")


def read_captions(path: str) -> Dict[str, List[str]]:
    """Captions JSONL -> ``{file_name: [caption, ...]}`` (file order kept)."""
    out: Dict[str, List[str]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out.setdefault(rec["file_name"], []).append(rec["caption"])
    return out
