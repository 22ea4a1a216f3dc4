"""The synthetic open-vocabulary world: files the real loaders read, base/novel split,
determinism, parameter validation, boxes that match the drawn pixels, the CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from regionclip_d2.synthetic.captions import PLURALS
from regionclip_d2.synthetic.shapes import COLORS, DEFAULT_NOVEL
from regionclip_d2.synthetic.world import (
    generate_sample,
    generate_world,
    load_world,
    read_captions,
    world_paths,
)
from regionclip_d2.synthetic.world_config import WorldConfig, WorldConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARAMS = dict(image_size=96, seed=3)
COUNTS = dict(num_train=40, num_val=16, num_test=12)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world"))
    generate_world(out, **COUNTS, **PARAMS)
    return out


def _coco(world_dir, split):
    with open(world_paths(world_dir, split)["instances"]) as f:
        return json.load(f)


def test_layout_and_world_json(world_dir):
    world = load_world(world_dir)
    assert world["image_size"] == 96 and world["seed"] == 3
    assert world["novel"] == list(DEFAULT_NOVEL)
    assert len(world["categories"]) >= 14 and len(world["colors"]) == 8
    assert {c["split"] for c in world["categories"]} == {"base", "novel"}
    assert world["counts"]["train"]["images"] == 40
    for split in ("train", "val", "test"):
        for key, rel in world["files"][split].items():
            assert os.path.exists(os.path.join(world_dir, rel)), (split, key, rel)
        coco = _coco(world_dir, split)
        assert coco["info"]["world_fingerprint"] == world["fingerprint"]
        assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
        for im in coco["images"]:
            img = Image.open(os.path.join(world_dir, split, im["file_name"]))
            assert img.mode == "RGB" and img.size == (im["width"], im["height"]) == (96, 96)
            break


def test_loads_with_pycocotools_and_detectron2(world_dir):
    from pycocotools.coco import COCO

    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import load_coco_json
    from detectron2.structures import BoxMode

    from regionclip_d2.data.datasets import register_coco_format

    for split in ("train", "val", "test"):
        paths = world_paths(world_dir, split)
        coco = COCO(paths["instances"])
        assert len(coco.getImgIds()) == COUNTS[f"num_{split}"]
        assert sorted(coco.getCatIds()) == list(range(1, 15))
        dicts = load_coco_json(paths["instances"], paths["images"])
        assert len(dicts) == COUNTS[f"num_{split}"]
        for d in dicts:
            assert os.path.isfile(d["file_name"])
            for a in d["annotations"]:
                assert a["bbox_mode"] == BoxMode.XYWH_ABS and a["iscrowd"] == 0
    name = register_coco_format("synthetic_world_test_val", world_paths(world_dir, "val")["instances"],
                                world_paths(world_dir, "val")["images"])
    recs = DatasetCatalog.get(name)
    assert len(recs) == COUNTS["num_val"] and sum(len(r["annotations"]) for r in recs) > COUNTS["num_val"]


def test_no_novel_boxes_in_train_but_in_val_test_and_train_captions(world_dir):
    world = load_world(world_dir)
    novel_ids = {c["id"] for c in world["categories"] if c["split"] == "novel"}
    train = _coco(world_dir, "train")
    assert train["annotations"] and not any(a["category_id"] in novel_ids for a in train["annotations"])
    assert world["counts"]["train"]["novel_annotations_removed"] > 0
    for split in ("val", "test"):
        assert any(a["category_id"] in novel_ids for a in _coco(world_dir, split)["annotations"])
    words = set(" ".join(c for cs in read_captions(world_paths(world_dir, "train")["captions"]).values()
                         for c in cs).replace(",", " ").split())
    seen = [n for n in world["novel"] if n in words or PLURALS[n] in words]
    assert len(seen) >= 3, seen


def test_captions_file(world_dir):
    caps = read_captions(world_paths(world_dir, "train")["captions"])
    assert len(caps) == 40 and all(len(v) == 2 for v in caps.values())
    with open(world_paths(world_dir, "train")["captions"]) as f:
        rec = json.loads(f.readline())
    assert set(rec) >= {"file_name", "caption"} and rec["file_name"].endswith(".png")


def test_deterministic_and_independent_of_workers(world_dir, tmp_path):
    again = str(tmp_path / "again")
    generate_world(again, **COUNTS, workers=2, **PARAMS)
    for split in ("train", "val", "test"):
        for key in ("instances", "captions"):
            a, b = world_paths(world_dir, split)[key], world_paths(again, split)[key]
            assert open(a, "rb").read() == open(b, "rb").read(), (split, key)
    png = "train_000007.png"
    assert open(os.path.join(world_dir, "train", png), "rb").read() == \
        open(os.path.join(again, "train", png), "rb").read()
    assert load_world(again)["fingerprint"] == load_world(world_dir)["fingerprint"]
    other = str(tmp_path / "other")
    generate_world(other, 4, 0, 0, image_size=96, seed=4)
    assert open(world_paths(other, "train")["instances"], "rb").read() != \
        open(world_paths(world_dir, "train")["instances"], "rb").read()
    assert load_world(other)["fingerprint"] != load_world(world_dir)["fingerprint"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_objects=0), "impossible object counts"),
    (dict(min_objects=3, max_objects=2), "impossible object counts"),
    (dict(max_objects=40), "do not fit"),
    (dict(max_size=200), "larger than the image"),
    (dict(min_size=50, max_size=40), "min_size <= max_size"),
    (dict(categories=[]), "empty"),
    (dict(categories=["circle", "star", "circle"], novel=["star"]), "duplicated"),
    (dict(categories=["circle", "blob"], novel=[]), "unknown shape"),
    (dict(novel=["unicorn"]), "not among the categories"),
    (dict(categories=["moon", "heart"], novel=["moon", "heart"]), "base"),
    (dict(image_size=100), "multiple of 32"),
    (dict(image_size=512), "between 96 and 320"),
    (dict(colour_prob=1.5), "probability"),
    (dict(max_rotation=200), "max_rotation"),
    (dict(max_rotation=-5), "max_rotation"),
])
def test_validation(kwargs, match):
    with pytest.raises(WorldConfigError, match=match):
        WorldConfig(**kwargs)


def test_boxes_match_drawn_pixels():
    cfg = WorldConfig(image_size=128, seed=5)
    n_objects = 0
    for i in range(30):
        image, objects, captions = generate_sample(cfg, "val", i, keep_masks=True)
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        assert 1 <= len(objects) <= cfg.max_objects and len(captions) == 2
        for o in objects:
            x, y, w, h = o.bbox
            assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and w >= 4 and h >= 4
            rows, cols = np.flatnonzero(o.mask.any(1)), np.flatnonzero(o.mask.any(0))
            assert (x, y, x + w - 1, y + h - 1) == (cols[0], rows[0], cols[-1], rows[-1])
            assert o.area == o.mask.sum() and o.area >= 0.15 * w * h
            drawn = image[o.mask].astype(float).mean(0)
            assert np.abs(drawn - np.array(COLORS[o.color])).max() < 30, (o.shape, o.color, drawn)
            n_objects += 1
        if len(objects) == 1:  # single objects are always named
            assert all(objects[0].shape in c for c in captions), captions
    assert n_objects >= 45


def test_max_rotation_keeps_shapes_upright():
    """With max_rotation=0 a square fills its box (only the mild aspect stretch remains); with
    any orientation many squares are tilted and fill much less of it. The angle takes one draw
    either way, so each image's first object (drawn before any placement retry) is the same."""
    def squares_fill(max_rotation):
        cfg = WorldConfig(image_size=96, categories=("square", "circle"), novel=("circle",), seed=2,
                          max_rotation=max_rotation)
        fills, layout = [], []
        for i in range(40):
            _, objects, _ = generate_sample(cfg, "train", i)
            layout.append((objects[0].shape, objects[0].color))
            fills += [o.area / (o.bbox[2] * o.bbox[3]) for o in objects if o.shape == "square"]
        return np.array(fills), layout

    upright, layout0 = squares_fill(0.0)
    tilted, layout180 = squares_fill(180.0)
    assert len(upright) >= 20 and np.mean(upright > 0.9) > 0.8  # the rest are partly hidden
    assert np.mean(tilted < 0.8) > 0.6
    assert layout0 == layout180


def test_caption_statistics():
    cfg = WorldConfig(seed=0)
    caps, singles, n = [], 0, 300
    for i in range(n):
        _, objects, c = generate_sample(cfg, "train", i)
        caps += c
        singles += len(objects) == 1
    with_colour = np.mean([any(w in COLORS for w in c.replace(",", " ").split()) for c in caps])
    assert 0.4 < with_colour < 0.6
    assert 0.35 < singles / n < 0.55
    assert any(w in " ".join(caps) for w in ("two ", "three "))
    assert any(r in " ".join(caps) for r in ("next to", "above", "below", "left of", "right of"))
    assert max(len(c.split()) for c in caps) <= 18


def test_cli(tmp_path):
    out = tmp_path / "cli"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "tools/make_synthetic_ovd.py", "--output-dir", str(out), "--num-train", "6",
                        "--num-val", "3", "--num-test", "2", "--image-size", "96", "--max-objects", "3",
                        "--novel", "moon,bolt", "--seed", "7", "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    world = load_world(str(out))
    assert world["novel"] == ["moon", "bolt"] and world["seed"] == 7 and world["params"]["max_objects"] == 3
    assert world["counts"]["test"]["images"] == 2 and "ms/image" in r.stdout
    r = subprocess.run([sys.executable, "tools/make_synthetic_ovd.py", "--output-dir", str(out), "--novel", "unicorn"],
                       cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "unicorn" in r.stderr and "not among the categories" in r.stderr
