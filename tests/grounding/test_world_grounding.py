"""The synthetic world writes grounding annotations: every span names its objects' shape, the
boxes are the COCO file's, the grounding reader reads the file back, and the captions and
COCO files of a seed are what they were before grounding existed."""
import hashlib
import json
import os

import numpy as np
import open_clip
import pytest

from regionclip_d2.grounding.data import grounding_positive_map, load_grounding_json
from regionclip_d2.synthetic.captions import PLURALS, make_caption, make_grounded_caption
from regionclip_d2.synthetic.rendering import render_image
from regionclip_d2.synthetic.world import generate_world, image_rng, world_paths
from regionclip_d2.synthetic.world_config import RENDER_REVISION, WorldConfig

PARAMS = dict(image_size=96, seed=3)
COUNTS = dict(num_train=20, num_val=6, num_test=6)
# sha256[:16] of (images, annotations, categories) of instances_<split>.json and of
# captions_<split>.jsonl for PARAMS and COUNTS, written by the generator before it wrote
# grounding files (render revision 1): adding grounding must not change them
GOLDEN = {"train": ("e16cc3cab1b1049c", "785a40ef61d0344d"), "val": ("376870726f1265df", "e40b7350bb3e98af"),
          "test": ("d2ba718610a99e38", "ddbf39f3eab345a3")}
NUMBERS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world"))
    generate_world(out, **COUNTS, **PARAMS)
    return out


def _json(path):
    with open(path) as f:
        return json.load(f)


def test_captions_and_coco_files_are_unchanged(world):
    if RENDER_REVISION != 1:
        pytest.skip("the golden hashes are of render revision 1")
    for split, (inst, caps) in GOLDEN.items():
        p = world_paths(world, split)
        d = _json(p["instances"])
        assert hashlib.sha256(json.dumps([d["images"], d["annotations"], d["categories"]]).encode()).hexdigest()[:16] \
            == inst, split
        with open(p["captions"], "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest()[:16] == caps, split


def test_grounded_caption_is_make_caption_with_the_same_draws():
    cfg = WorldConfig(image_size=96, seed=7, colour_prob=1.0, max_objects=6, partial_prob=0.5)
    for i in range(60):
        rng = image_rng(cfg.seed, "val", i)
        _, objects = render_image(cfg, rng)
        r1, r2 = np.random.default_rng(), np.random.default_rng()
        r1.bit_generator.state = r2.bit_generator.state = rng.bit_generator.state
        for _ in range(3):
            caption, phrases = make_grounded_caption(objects, cfg, r2)
            assert make_caption(objects, cfg, r1) == caption
            assert sorted(m for p in phrases for m in p.members) == sorted(set(m for p in phrases for m in p.members))
        assert r1.bit_generator.state == r2.bit_generator.state


def _check_phrase(text, shapes, n):
    """``text`` names ``n`` objects of one shape: "a red star", "two small? blue rings"."""
    assert len(set(shapes)) == 1, (text, shapes)
    shape = shapes[0]
    words = text.split()
    assert words[-1] == (shape if n == 1 else PLURALS[shape]), (text, shape, n)
    assert NUMBERS[words[0]] == n, (text, n)


def test_spans_name_their_objects(world):
    world_json = _json(os.path.join(world, "world.json"))
    novel = set(world_json["novel"])
    names = {c["id"]: c["name"] for c in world_json["categories"]}
    for split in ("train", "val", "test"):
        p = world_paths(world, split)
        g, inst = _json(p["grounding"]), _json(p["instances"])
        with open(p["captions"]) as f:
            captions = [(c["file_name"], c["caption"]) for c in map(json.loads, f)]
        assert [(e["file_name"], e["caption"]) for e in g["images"]] == captions
        boxes = {}
        for a in inst["annotations"]:
            boxes.setdefault(a["image_id"], []).append((a["category_id"], a["bbox"]))
        by_entry = {}
        for a in g["annotations"]:
            by_entry.setdefault(a["image_id"], []).append(a)
        assert world_json["counts"][split]["grounding_annotations"] == len(g["annotations"]) > 0
        for e in g["images"]:
            anns = by_entry.get(e["id"], [])
            for k, spans in enumerate(e["tokens_positive_eval"]):
                members = [a for a in anns if a["phrase_ids"] == k]
                assert members and all(a["tokens_positive"] == spans for a in members)
                (s, t), = spans
                _check_phrase(e["caption"][s:t], [names[a["category_id"]] for a in members], len(members))
                for a in members:  # the box is the COCO file's box of that object
                    assert (a["category_id"], a["bbox"]) in boxes[e["original_img_id"]]
            assert len(anns) == sum(1 for a in anns if a["phrase_ids"] < len(e["tokens_positive_eval"]))
            if split == "train":  # novel shapes: named, boxes withheld
                assert not any(names[a["category_id"]] in novel for a in anns)
                for s, t in e["tokens_withheld"]:
                    assert e["caption"][s:t].split()[-1] in {n for c in novel for n in (c, PLURALS[c])}
            else:
                assert "tokens_withheld" not in e
        if split != "train":
            assert any(names[a["category_id"]] in novel for a in g["annotations"])


def test_the_reader_reads_it_back(world):
    tok = open_clip.SimpleTokenizer(context_length=24)  # the world CLIP's context
    for split in ("train", "val"):
        p = world_paths(world, split)
        dicts = load_grounding_json(p["grounding"], p["images"], tokenizer=tok)
        raw = _json(p["grounding"])
        assert len(dicts) == len(raw["images"]) and sum(len(d["annotations"]) for d in dicts) == len(raw["annotations"])
        for d in dicts:
            assert os.path.isfile(d["file_name"]) and d["num_positions"] <= 24
            pm = grounding_positive_map(d, 24)
            for a, row in zip(d["annotations"], pm):
                (s, t), = a["tokens_positive"]
                # the phrase's tokens, decoded, are the phrase
                assert tok.decode(tok([d["caption"]])[0][row.bool()].tolist()).strip() == d["caption"][s:t]
