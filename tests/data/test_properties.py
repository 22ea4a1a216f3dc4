"""Property-based tests (hypothesis) of everything that reads outside input or makes boxes:
the caption readers and the concept parser, vocabulary files, the COCO annotation check
and loader, the pretraining region generators and the detector's score fusion and
post-processing.

Each property draws inputs that real files contain by accident (any unicode, control
characters, empty and huge strings, tabs and newlines inside fields, invalid JSON, NaN and
infinite numbers, wrong types, duplicate and unknown ids, inverted or empty boxes) and
checks that the result is either right or one of the documented errors (CaptionFormatError,
VocabularyError, AnnotationError), never a stray KeyError / TypeError / RecursionError.
Runs are deterministic (``derandomize=True``) and small, so the file stays fast.
"""
import gzip
import json
import math
import re
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances

from regionclip_d2.data import caption_files as C
from regionclip_d2.data import json_stream
from regionclip_d2.data.concepts import (
    CaptionFormatError,
    caption_problem,
    iter_caption_records,
    new_stats,
    parse_caption,
    read_captions,
)
from regionclip_d2.data.datasets import AnnotationError, check_coco_annotations, register_coco_format
from regionclip_d2.data.vocabularies import VocabularyError, check_vocabulary, load_vocabulary, read_vocabulary_file
from regionclip_d2.modeling.losses import cosine_logits, pseudo_labels
from regionclip_d2.modeling.meta_arch.pretrain import grid_boxes, random_boxes
from regionclip_d2.modeling.roi_heads.ov_predictor import OpenVocabularyPredictor


def props(n=60):
    return settings(derandomize=True, max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# captions and concepts
# ---------------------------------------------------------------------------------------------
WORDS = ["a", "the", "two", "of", "on", "with", "next", "to", "is", "red", "blue", "big", "wooden", "dog", "dogs",
         "cat", "men", "geese", "pants", "glasses", "doors", "traffic", "lights", "t-shirt", "comics", "soles",
         "bases-on-balls", "box-kodaks", "x", "I", "A", "DOG", "3", "42nd", "'s", ",", ".", "!", "--", "-", "e.g.",
         "Ünïcödé", "犬", "кот", "\t", "\n", "\x00", "\u200b", "\ufffd", "\ufeff"]
sentences = st.lists(st.sampled_from(WORDS), max_size=25).map(" ".join)
captions = st.one_of(sentences, st.text(max_size=80),  # st.text: any code point but surrogates, controls included
                     st.text(alphabet=st.characters(whitelist_categories=("Cc", "Zs", "Zl", "Zp")), max_size=10))
CONCEPT = re.compile(r"^[a-z]+(?:-[a-z]+)*(?: [a-z]+(?:-[a-z]+)*)*$")
PROBLEMS = {None, "empty", "too_long", "non_english"}


@props(80)
@given(text=captions, max_phrase_words=st.integers(0, 6))
@example(text="a pile of comics", max_phrase_words=4)  # WordNet lists comic_strip first
@example(text="a big red shiny metal toy car", max_phrase_words=0)
@example(text="dog " * 25_000, max_phrase_words=4)  # 100k characters
@example(text="\x00\t\n\r\x0b\x0c\x1c\x85\u2028", max_phrase_words=4)
def test_parse_caption_outputs_concepts(text, max_phrase_words):
    out = parse_caption(text, max_phrase_words)
    assert isinstance(out, list) and len(out) == len(set(out))
    for c in out:
        assert CONCEPT.match(c), c  # lower-case words of letters with inner hyphens, single spaces
        words = c.split(" ")
        assert len(words) <= max(1, max_phrase_words) and len(words[-1]) >= 2
        if len(words) > 1:  # a phrase's head noun counts alone too, and comes first
            assert words[-1] in out and out.index(words[-1]) < out.index(c)
    assert parse_caption(text, max_phrase_words) == out  # deterministic


@props(100)
@given(text=captions, max_chars=st.sampled_from([None, 0, 1, 10, 1000]))
@example(text="x" * 100_000, max_chars=1000)
def test_caption_problem(text, max_chars):
    p = caption_problem(text, max_chars)
    assert p in PROBLEMS and caption_problem(text, max_chars) == p
    has_letters = any(c.isalpha() for c in text)
    assert (p == "empty") == (not has_letters)
    if has_letters and max_chars and len(text) > max_chars:
        assert p == "too_long"
    if not max_chars:
        assert p != "too_long"


class Skip(str):
    """The stats counter a skipped caption goes to (a str subclass, told apart from a caption)."""


def _expected(caption, max_chars, english_only):
    """What the readers should do with one raw caption: the cleaned caption, or Skip(counter)."""
    if not isinstance(caption, str):
        return Skip("bad_records")
    text = " ".join(caption.split())
    problem = caption_problem(text, max_chars)
    if problem == "non_english" and not english_only:
        problem = None
    return Skip(problem) if problem else text


def _check_stats(stats, got):
    skipped = sum(stats[k] for k in ("empty", "non_english", "too_long", "bad_records"))
    assert stats["records"] == stats["captions"] + skipped
    assert stats["captions"] == len(got)
    assert stats["bad_encoding"] <= stats["captions"] and stats["unknown_image_id"] <= stats["captions"]
    for rec in got:
        assert isinstance(rec["caption"], str) and rec["caption"] == " ".join(rec["caption"].split())
        assert rec["caption"] and caption_problem(rec["caption"], None) in (None, "non_english")
        assert rec["file_name"] is None or (isinstance(rec["file_name"], str) and rec["file_name"])


def _write(path, data: bytes, gz: bool):
    if gz:
        path = path + ".gz"
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)
    return path


file_names = st.text(alphabet=st.characters(blacklist_characters="\t\n\r\ufeff", blacklist_categories=("Cs",)),
                     max_size=12).map(lambda s: s + ".jpg")
junk_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                         lambda ch: st.lists(ch, max_size=3) | st.dictionaries(st.text(max_size=4), ch, max_size=3),
                         max_leaves=6)
caption_values = st.one_of(captions, captions, captions, junk_json)
read_opts = dict(max_chars=st.sampled_from([None, 30, 1000]), english_only=st.booleans(), gz=st.booleans())


@props(60)
@given(lines=st.lists(st.one_of(
    st.tuples(st.just("record"), st.sampled_from(C._FILE_KEYS + ("no_file",)), st.one_of(file_names, junk_json),
              st.sampled_from(C._CAPTION_KEYS), st.one_of(caption_values, st.lists(caption_values, max_size=3))),
    st.tuples(st.just("junk"), st.one_of(
        st.text(max_size=30).map(lambda s: "{" + s.replace("}", "")),  # unterminated JSON
        junk_json.filter(lambda v: not isinstance(v, dict)).map(json.dumps),  # JSON, not an object
        st.dictionaries(st.sampled_from(["file_name", "id", "Caption", "txt"]), junk_json).map(json.dumps),
        st.just("[" * 5000 + "]" * 5000),  # nested deeper than the json module can go
    )),
    st.tuples(st.just("blank"), st.text(alphabet=" \t\r\x0b\x0c", max_size=3)),
), max_size=12), **read_opts)
def test_jsonl_reader(tmp_path, lines, max_chars, english_only, gz):
    text, expected, bad = [], [], 0
    for line in lines:
        if line[0] == "blank":
            text.append(line[1])
            continue
        if line[0] == "junk":
            text.append(line[1])
            bad += 1
            continue
        _, fkey, fname, ckey, cap = line
        obj = {} if fkey == "no_file" else {fkey: fname}
        obj[ckey] = cap
        text.append(json.dumps(obj, ensure_ascii=len(text) % 2 == 0))
        fn = fname if fkey != "no_file" and isinstance(fname, str) and fname else None  # else unknown
        for c in (cap if isinstance(cap, list) else [cap]):
            expected.append((fn, _expected(c, max_chars, english_only)))
    path = _write(str(tmp_path / "c.jsonl"), "\n".join(text).encode("utf-8", "surrogatepass"), gz)
    stats = new_stats()
    got = list(iter_caption_records(path, "auto", stats, max_chars, english_only))
    _check_stats(stats, got)
    assert [(r["file_name"], r["caption"]) for r in got] == [(f, c) for f, c in expected if not isinstance(c, Skip)]
    assert stats["bad_records"] == bad + sum(c == "bad_records" for _, c in expected)
    for key in ("empty", "too_long", "non_english"):
        assert stats[key] == sum(c == key for _, c in expected)


@props(60)
@given(rows=st.lists(st.tuples(file_names, captions.filter(lambda c: "\n" not in c)), max_size=10),
       header=st.booleans(), crlf=st.booleans(), **read_opts)
@example(rows=[(" .jpg", "a dog\tand a cat"), ("b.jpg", "")], header=False, crlf=True, max_chars=None,
         english_only=True, gz=False)
def test_tsv_reader(tmp_path, rows, header, crlf, max_chars, english_only, gz):
    eol = "\r\n" if crlf else "\n"
    lines = (["filepath\ttitle"] if header else []) + [f"{f}\t{c}" for f, c in rows]
    path = _write(str(tmp_path / "c.tsv"), eol.join(lines).encode("utf-8"), gz)
    stats = new_stats()
    got = list(read_captions(path, "auto", stats, max_chars, english_only))
    expected = [(f.strip() or None, _expected(c, max_chars, english_only)) for f, c in rows]
    # a tab inside a caption is kept as a space; \r only ends a line before the \n
    assert got == [(f, c) for f, c in expected if not isinstance(c, Skip)]
    assert stats["records"] == len(rows)


@props(40)
@given(data=st.binary(max_size=300), fmt=st.sampled_from(["jsonl", "tsv", "coco", "auto"]),
       ext=st.sampled_from([".jsonl", ".tsv", ".json", ".txt"]))
@example(data=b"a.jpg\t\xff\xfe a dog on a mat\n\xc3", fmt="tsv", ext=".tsv")
@example(data=b'{"images": [], "annotations": {"a": 1}}', fmt="coco", ext=".json")
@example(data=b'{"annotations": [' + b"[" * 5000, fmt="coco", ext=".json")
def test_any_bytes_read_or_format_error(tmp_path, data, fmt, ext):
    path = _write(str(tmp_path / ("c" + ext)), data, False)
    stats = new_stats()
    try:
        got = list(iter_caption_records(path, fmt, stats))
    except CaptionFormatError:
        return
    _check_stats(stats, got)
    assert stats["bad_encoding"] == sum("\ufffd" in r["caption"] for r in got)


@props(50)
@given(images=st.lists(st.tuples(st.one_of(st.integers(0, 5), st.text(max_size=2), junk_json), file_names),
                       max_size=4),
       anns=st.lists(st.one_of(
           st.fixed_dictionaries({"image_id": st.one_of(st.integers(0, 6), junk_json), "caption": caption_values}),
           st.fixed_dictionaries({"image_id": st.integers(0, 5)}), junk_json), max_size=8),
       chunk=st.sampled_from([1, 3, 17, 1 << 20]), indent=st.sampled_from([None, 0, 2]),
       annotations_first=st.booleans(), **read_opts)
@example(images=[([1], "a.jpg")], anns=[{"image_id": [1], "caption": "a dog on a mat"}, 0.5, 1e-07], chunk=1,
         indent=None, annotations_first=False, max_chars=None, english_only=True, gz=False)  # "0" | ".5" split
def test_coco_reader(tmp_path, images, anns, chunk, indent, annotations_first, max_chars, english_only, gz):
    imgs = [{"id": i, "file_name": f, "height": 10, "width": 10} for i, f in images]
    data = {"info": {"nested": [1, [2, {"x": "]}"}]]}}
    parts = [("annotations", anns), ("images", imgs)]
    data.update(parts if annotations_first else parts[::-1])
    text = json.dumps(data, indent=indent, ensure_ascii=chunk != 3)
    path = _write(str(tmp_path / "c.json"), text.encode("utf-8", "surrogatepass"), gz)
    known = {}
    for i, f in images:
        if not isinstance(i, (list, dict)):
            known[json.loads(json.dumps(i))] = f  # the last image of an id wins (as JSON reads it back)
    stats = new_stats()
    with mock.patch.object(json_stream, "JSON_CHUNK_BYTES", chunk):  # values and UTF-8 split across reads
        got = list(iter_caption_records(path, "coco", stats, max_chars, english_only))
    _check_stats(stats, got)
    expected = []
    for a in anns:
        if not isinstance(a, dict) or "caption" not in a:
            continue
        c = _expected(a["caption"], max_chars, english_only)
        if isinstance(c, Skip):
            continue
        iid = a["image_id"]
        fn = known.get(iid) if not isinstance(iid, (list, dict)) else None
        expected.append((fn, c))
    assert [(r["file_name"], r["caption"]) for r in got] == expected
    assert stats["bad_records"] == sum(not isinstance(a, dict) or "caption" not in a or
                                       not isinstance(a["caption"], str) for a in anns)


# ---------------------------------------------------------------------------------------------
# vocabularies
# ---------------------------------------------------------------------------------------------
# names as a text file can hold them: no line break (open() reads \r as one), not a comment
line_names = st.text(alphabet=st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)),
                     min_size=1, max_size=15).filter(lambda n: n.strip() and not n.strip().startswith("#"))


def _vocab_outcome(names):
    """check_vocabulary's documented result: the stripped names, or the error it names."""
    stripped = [n.strip() for n in names]
    if not stripped:
        return "empty"
    if not all(stripped):
        return "empty"
    if len(set(stripped)) < len(stripped):
        return "duplicate"
    return stripped


@props(60)
@given(names=st.lists(line_names, min_size=1, max_size=12), blanks=st.lists(st.integers(0, 12), max_size=4),
       comments=st.lists(st.tuples(st.integers(0, 12), st.text(max_size=10).map(lambda s: "#" + s.replace("\n", "")
                                                                                .replace("\r", ""))), max_size=3),
       crlf=st.booleans(), bom=st.booleans(), pad=st.sampled_from(["", " ", "\t", " \x0c"]))
@example(names=["a\x0cb", "c"], blanks=[], comments=[], crlf=False, bom=False, pad="")  # was split in two
@example(names=["cat", "dog"], blanks=[], comments=[], crlf=True, bom=True, pad="")  # BOM was part of 'cat'
@example(names=["x\u2028y"], blanks=[], comments=[], crlf=False, bom=False, pad="")
def test_vocabulary_text_file(tmp_path, names, blanks, comments, crlf, bom, pad):
    lines = [pad + n + pad for n in names]
    for i in sorted(blanks, reverse=True):
        lines.insert(min(i, len(lines)), pad)
    for i, c in comments:
        lines.insert(min(i, len(lines)), c)
    text = ("\ufeff" if bom else "") + ("\r\n" if crlf else "\n").join(lines)
    path = tmp_path / "v.txt"
    path.write_bytes(text.encode("utf-8"))
    want = _vocab_outcome(names)
    try:
        got = read_vocabulary_file(str(path))
    except VocabularyError as e:
        assert isinstance(want, str) and want in str(e), (want, e)
        if want == "duplicate":
            stripped = [n.strip() for n in names]
            dup = next(n for i, n in enumerate(stripped) if n in stripped[:i])
            assert repr(dup) in str(e)
        return
    assert got == want
    assert load_vocabulary(str(path)) == want


@props(60)
@given(value=st.one_of(
    st.lists(st.one_of(st.text(max_size=8), st.text(max_size=8), junk_json), max_size=6),
    st.lists(st.fixed_dictionaries({"name": st.one_of(st.text(max_size=8), junk_json)}), max_size=6),
    st.fixed_dictionaries({"categories": st.lists(st.fixed_dictionaries(
        {"id": st.one_of(st.integers(-3, 9), st.floats(allow_nan=True), junk_json), "name": st.text(max_size=8)}),
        max_size=6)}),
    junk_json))
@example(value=[None, "cat"])  # was the class 'None'
@example(value={"categories": [{"id": None, "name": "a"}, {"id": 1, "name": "b"}]})  # was a TypeError in sorted()
@example(value={"categories": [1, 2]})
def test_vocabulary_json_file(tmp_path, value):
    path = tmp_path / "v.json"
    path.write_text(json.dumps(value))
    try:
        got = read_vocabulary_file(str(path))
    except VocabularyError:
        return
    assert isinstance(got, list) and got and all(isinstance(n, str) and n == n.strip() and n for n in got)
    assert len(set(got)) == len(got)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        assert got == [v.strip() for v in value]


@props(40)
@given(data=st.binary(max_size=200), ext=st.sampled_from([".txt", ".json"]))
@example(data=b"cat\n\xff\xfedog\n", ext=".txt")  # not UTF-8: was a UnicodeDecodeError
@example(data=b"[" * 5000, ext=".json")
def test_vocabulary_any_bytes(tmp_path, data, ext):
    path = tmp_path / ("v" + ext)
    path.write_bytes(data)
    try:
        got = read_vocabulary_file(str(path))
    except VocabularyError:
        return
    assert got and all(isinstance(n, str) and n for n in got) and len(set(got)) == len(got)


@props(80)
@given(names=st.one_of(st.lists(st.one_of(st.text(max_size=6), st.text(max_size=6), junk_json), max_size=6),
                       junk_json))
def test_check_vocabulary(names):
    try:
        got = check_vocabulary(names)
    except VocabularyError:
        want = _vocab_outcome(names) if isinstance(names, list) and all(isinstance(n, str) for n in names) else None
        assert not isinstance(want, list)
        return
    assert isinstance(names, (list, dict)) and all(isinstance(n, str) for n in names)
    assert got == _vocab_outcome(list(names))


@props(60)
@given(names=st.lists(st.text(max_size=8).filter(lambda s: "," not in s), min_size=2, max_size=8))
def test_comma_separated_vocabulary(names):
    try:
        got = load_vocabulary(",".join(names))
    except VocabularyError as e:
        want = _vocab_outcome(names)
        assert isinstance(want, str) and want in str(e)
        return
    assert got == _vocab_outcome(names)


# ---------------------------------------------------------------------------------------------
# COCO annotations
# ---------------------------------------------------------------------------------------------
coords = st.one_of(st.integers(-50, 150), st.floats(-1e3, 1e3), st.sampled_from(
    [0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324]))
junk = st.one_of(st.sampled_from([None, "x", "", True, float("nan"), -1, 0, 1.5]),  # fresh containers:
                 st.builds(list), st.builds(dict), st.builds(lambda: [1]))  # the check edits what it is given


def _coco(n_images, n_cats, boxes):
    images = [{"id": i + 1, "file_name": f"{i}.png", "height": 60 + i, "width": 80 + i} for i in range(n_images)]
    cats = [{"id": c + 1, "name": f"class {c}"} for c in range(n_cats)]
    anns = [{"id": k + 1, "image_id": (k % n_images) + 1, "category_id": (k % n_cats) + 1, "bbox": list(b)}
            for k, b in enumerate(boxes)]
    return {"images": images, "annotations": anns, "categories": cats}


def _assert_valid_result(data, stats, n_in):
    images = {im["id"]: im for im in data["images"]}
    ids = [a["id"] for a in data["annotations"]]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) and i > 0 for i in ids)
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        im = images[a["image_id"]]
        assert all(math.isfinite(v) for v in (x, y, w, h)) and w > 0 and h > 0
        assert x >= 0 and y >= 0 and x + w <= im["width"] * (1 + 1e-9) and y + h <= im["height"] * (1 + 1e-9)
    dropped = sum(n for k, n in stats.items() if "dropped" in k and "images missing" not in k)
    assert len(data["annotations"]) + dropped == n_in


@props(80)
@given(boxes=st.lists(st.tuples(coords, coords, coords, coords), max_size=10), n_images=st.integers(1, 3),
       dup_ids=st.booleans())
@example(boxes=[(float("nan"), 0, 5, 5)], n_images=1, dup_ids=False)  # was clipped to the whole image
@example(boxes=[(float("-inf"), 0, float("inf"), 5)], n_images=1, dup_ids=False)
@example(boxes=[(0, 0, 5, 5), (10, 10, 0, 5), (-20, -20, 10, 10), (70, 50, 100, 100)], n_images=1, dup_ids=True)
def test_check_coco_boxes(boxes, n_images, dup_ids):
    data = _coco(n_images, 2, boxes)
    if dup_ids:
        for a in data["annotations"]:
            a["id"] = 0
    inside = [dict(a) for a in data["annotations"] if all(math.isfinite(v) for v in a["bbox"])
              and a["bbox"][2] > 0 and a["bbox"][3] > 0 and a["bbox"][0] >= 0 and a["bbox"][1] >= 0
              and a["bbox"][0] + a["bbox"][2] <= data["images"][a["image_id"] - 1]["width"]
              and a["bbox"][1] + a["bbox"][3] <= data["images"][a["image_id"] - 1]["height"]]
    broken = [a for a in data["annotations"] if not all(math.isfinite(v) for v in a["bbox"])
              or a["bbox"][2] <= 0 or a["bbox"][3] <= 0]
    stats = check_coco_annotations(data, "ann.json")
    _assert_valid_result(data, stats, len(boxes))
    kept = [a["bbox"] for a in data["annotations"]]
    assert all(a["bbox"] in kept for a in inside)  # a valid box inside its image is kept as it is
    assert not any(a is k for a in broken for k in data["annotations"])  # NaN, inf, empty: never kept


def _mutate(data, draw):
    """Replace or delete one value somewhere in a COCO dict with junk."""
    where = draw(st.sampled_from(["top", "images", "categories", "annotations", "ann_field", "img_field",
                                  "cat_field", "bbox_item", "bbox_item", "ann_id"]))
    value = draw(junk)
    if where == "top":
        key = draw(st.sampled_from(["images", "annotations", "categories"]))
        if draw(st.booleans()):
            data.pop(key, None)
        else:
            data[key] = value
        return
    if where in ("images", "categories", "annotations"):
        if isinstance(data.get(where), list) and data[where]:
            data[where][draw(st.integers(0, len(data[where]) - 1))] = value
        return
    lst, keys = {"ann_field": ("annotations", ["id", "image_id", "category_id", "bbox"]),
                 "ann_id": ("annotations", ["id"]),  # any value: ids are renumbered
                 "img_field": ("images", ["id", "file_name", "height", "width"]),
                 "cat_field": ("categories", ["id", "name"]),
                 "bbox_item": ("annotations", None)}[where]
    if not isinstance(data.get(lst), list) or not data[lst]:
        return
    item = data[lst][draw(st.integers(0, len(data[lst]) - 1))]
    if not isinstance(item, dict):
        return
    if keys is None:
        if isinstance(item.get("bbox"), list):
            item["bbox"][draw(st.integers(0, 3))] = value
    elif draw(st.booleans()):
        item.pop(draw(st.sampled_from(keys)), None)
    else:
        item[draw(st.sampled_from(keys))] = value


@props(100)
@given(draw=st.data(), n_mut=st.integers(0, 2))
def test_check_coco_malformed(draw, n_mut):
    data = _coco(2, 2, [(1, 1, 10, 10), (5, 5, 20, 20), (0, 0, 80, 60)])
    if draw.draw(st.integers(0, 3)) == 0:  # duplicate / unknown ids, besides the junk values
        which = draw.draw(st.sampled_from(["images", "categories", "unknown_cat", "unknown_img"]))
        if which in ("images", "categories"):
            data[which][1]["id"] = data[which][0]["id"]
        else:
            data["annotations"][0]["category_id" if which == "unknown_cat" else "image_id"] = 99
    for _ in range(n_mut):
        _mutate(data, draw.draw)
    n_in = len(data["annotations"]) if isinstance(data.get("annotations"), list) else 0
    try:
        stats = check_coco_annotations(data, "ann.json")
    except AnnotationError as e:
        assert "ann.json" in str(e)
        event("AnnotationError: " + re.sub(r"\[\d+\]|\(id .*?\)|has .* which|has \S+:", "", str(e))[:45])
        return
    event("checked")
    _assert_valid_result(data, stats, n_in)


@props(25)
@given(draw=st.data())
def test_registered_coco_loads_or_annotation_error(tmp_path, draw):
    data = _coco(2, 2, [(1, 1, 10, 10)] + draw.draw(st.lists(st.tuples(coords, coords, coords, coords), max_size=5)))
    for c in data["categories"]:
        c["split"] = draw.draw(st.sampled_from(["base", "novel"]))
    for _ in range(draw.draw(st.integers(0, 2))):
        _mutate(data, draw.draw)
    (tmp_path / "img").mkdir(exist_ok=True)
    for i in range(2):
        (tmp_path / "img" / f"{i}.png").write_bytes(b"")
    (tmp_path / "ann.json").write_text(json.dumps(data))
    split = draw.draw(st.sampled_from([None, "base"]))
    name = "hypothesis_coco_property"
    try:
        register_coco_format(name, str(tmp_path / "ann.json"), str(tmp_path / "img"), category_split=split)
        records = DatasetCatalog.get(name)
    except AnnotationError as e:
        assert "ann.json" in str(e)
        event("AnnotationError")
        return
    finally:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    event(f"loaded, {sum(len(r['annotations']) for r in records) > 0 and 'with' or 'without'} boxes")
    for r in records:
        for obj in r["annotations"]:
            x, y, w, h = obj["bbox"]
            assert all(math.isfinite(v) for v in (x, y, w, h)) and w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= r["width"] + 1e-6 and y + h <= r["height"] + 1e-6


def test_invalid_json_is_an_annotation_error(tmp_path):
    for text in ("{not json", "[" * 5000, '["images"]', "\ufeff{}"):
        (tmp_path / "ann.json").write_text(text, encoding="utf-8")
        (tmp_path / "img").mkdir(exist_ok=True)
        with pytest.raises(AnnotationError, match="ann.json"):
            register_coco_format("bad_json_property", str(tmp_path / "ann.json"), str(tmp_path / "img"))


# ---------------------------------------------------------------------------------------------
# boxes: region generators, score fusion, post-processing
# ---------------------------------------------------------------------------------------------
@props(60)
@given(h=st.integers(1, 5000), w=st.integers(1, 5000), rows=st.integers(1, 8), cols=st.integers(1, 8))
def test_grid_boxes_tile_the_image(h, w, rows, cols):
    b = grid_boxes(h, w, rows, cols)
    assert b.shape == (rows * cols, 4) and torch.isfinite(b).all()
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    area = ((b[:, 2] - b[:, 0]).double() * (b[:, 3] - b[:, 1]).double()).sum()
    assert abs(float(area) - h * w) <= 1e-5 * h * w


@props(60)
@given(h=st.integers(1, 5000), w=st.integers(1, 5000), n=st.integers(0, 50), seed=st.integers(0, 2 ** 31),
       min_frac=st.sampled_from([0.1, 0.01, 0.5, 1.0]))
def test_random_boxes_inside_with_positive_area(h, w, n, seed, min_frac):
    b = random_boxes(h, w, n, generator=torch.Generator().manual_seed(seed), min_frac=min_frac)
    assert b.shape == (n, 4) and torch.isfinite(b).all()
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    assert (bw > 0).all() and (bh > 0).all()
    assert (bw >= min_frac * w * (1 - 1e-5)).all() and (bh >= min_frac * h * (1 - 1e-5)).all()


box_coord = st.one_of(st.floats(-200, 400, width=32), st.sampled_from(
    [0.0, 1e30, -1e30, 3e38, float("inf"), float("-inf"), float("nan")]))
logit = st.one_of(st.floats(-50, 50, width=32), st.sampled_from([0.0, 1e30, -1e30, float("inf"), float("-inf"),
                                                                 float("nan")]))


def _predictor(fusion, no_box_delta, thresh):
    return OpenVocabularyPredictor(ShapeSpec(channels=8), embed_dim=8, box2box_transform=Box2BoxTransform(
        (10.0, 10.0, 5.0, 5.0)), fusion=fusion, no_box_delta=no_box_delta, test_score_thresh=thresh,
        test_nms_thresh=0.5, test_topk_per_image=100).eval()


@props(60)
@given(boxes=st.lists(st.lists(box_coord, min_size=4, max_size=4), max_size=8),
       logits=st.lists(logit, min_size=8, max_size=8),
       fusion=st.sampled_from(["none", "geometric", "legacy"]), no_box_delta=st.booleans(),
       size=st.tuples(st.integers(1, 300), st.integers(1, 300)), n_classes=st.integers(1, 4),
       thresh=st.sampled_from([0.0, 0.05]), seed=st.integers(0, 1000))
@example(boxes=[[5, 5, 5, 5], [50, 40, 10, 10], [0, 0, 1e30, 1e30]], logits=[1.0] * 8, fusion="geometric",
         no_box_delta=False, size=(60, 80), n_classes=2, thresh=0.0, seed=0)  # zero-area, inverted, huge
def test_score_fusion_and_postprocessing(boxes, logits, fusion, no_box_delta, size, n_classes, thresh, seed):
    g = torch.Generator().manual_seed(seed)
    pred = _predictor(fusion, no_box_delta, thresh)
    pred.test_vocabulary.set(torch.randn(n_classes, 8, generator=g))
    n = len(boxes)
    logits = logits[:n]
    p = Instances(size, proposal_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)),
                  objectness_logits=torch.tensor(logits, dtype=torch.float32))
    feats = torch.randn(n, 8, generator=g) * 10
    if n:
        feats[0] = 0  # a zero feature: cosine 0 with every class
    with torch.no_grad():
        predictions = pred(feats)
        fused = pred.predict_probs(predictions, [p])[0]
        out = pred.inference(predictions, [p])[0][0]
    assert fused.shape == (n, n_classes + 1)
    finite_rows = torch.isfinite(p.objectness_logits)
    if fusion in ("none", "geometric"):
        f = fused[finite_rows] if fusion == "geometric" else fused
        assert torch.isfinite(f).all() and (f >= 0).all() and (f <= 1).all()
    s, b, c = out.scores, out.pred_boxes.tensor, out.pred_classes
    event(f"{fusion}: {'some' if len(s) else 'no'} detections")
    assert torch.isfinite(s).all() and torch.isfinite(b).all()  # nothing NaN/inf reaches the output
    assert (s >= thresh).all() and (s >= 0).all()
    if fusion != "legacy":  # the official legacy fusion multiplies by the raw logit: not a probability
        assert (s <= 1).all()
    assert ((c >= 0) & (c < n_classes)).all()
    h, w = size
    assert (b[:, 0::2] >= 0).all() and (b[:, 0::2] <= w).all() and (b[:, 1::2] >= 0).all() and (b[:, 1::2] <= h).all()


f32 = st.floats(allow_nan=False, allow_infinity=False, width=32)  # any finite float32, subnormals too


@props(60)
@given(x=st.lists(st.lists(f32, min_size=4, max_size=4), min_size=1, max_size=5),
       y=st.lists(st.lists(f32, min_size=4, max_size=4), min_size=1, max_size=5),
       threshold=st.floats(0, 1))
@example(x=[[0.0] * 4], y=[[0.0] * 4, [1.0, 0, 0, 0]], threshold=0.9)  # zero vectors
def test_cosine_logits_and_pseudo_labels_finite(x, y, threshold):
    logits = cosine_logits(torch.tensor(x), torch.tensor(y), 0.01)
    assert torch.isfinite(logits).all() and (logits.abs() <= 100 * (1 + 1e-5)).all()
    labels, soft, keep = pseudo_labels(logits, threshold)
    assert keep.any() and ((labels >= 0) & (labels < len(y))).all()
    assert torch.allclose(soft.sum(-1), torch.ones(len(x)), atol=1e-5)


_STRUCTURAL = {  # mutation -> the entry the error must name
    "bbox not a list": (lambda d: d["annotations"][1].__setitem__("bbox", "oops"), r"annotations\[1\] \(id 11\)"),
    "image without id": (lambda d: d["images"][1].pop("id"), r"images\[1\] lacks 'id'"),
    "unknown image": (lambda d: d["annotations"][1].__setitem__("image_id", 99), r"annotations\[1\].*image_id 99"),
    "unknown category": (lambda d: d["annotations"][1].__setitem__("category_id", 7),
                         r"annotations\[1\].*category_id 7"),
    "duplicate image id": (lambda d: d["images"][1].__setitem__("id", 1), r"images\[1\] repeats id 1"),
    "categories not a list": (lambda d: d.__setitem__("categories", {"a": 1}), r"no 'categories' list"),
    "width not a number": (lambda d: d["images"][0].__setitem__("width", "wide"), r"images\[0\] \(id 1\).*width"),
    "annotation not an object": (lambda d: d["annotations"].__setitem__(1, 5), r"annotations\[1\] is not an object"),
    "category without name": (lambda d: d["categories"][1].pop("name"), r"categories\[1\] lacks"),
}


@pytest.mark.parametrize("case", sorted(_STRUCTURAL))
def test_structural_annotation_errors_name_the_entry(case):
    """Each structural error is an AnnotationError naming the file and the offending entry
    (index and id), never a result and never a stray KeyError / TypeError."""
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 80},
                       {"id": 2, "file_name": "b.png", "width": 100, "height": 80}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]},
                            {"id": 11, "image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 20]}]}
    check_coco_annotations(json.loads(json.dumps(data)), "ann.json")  # the intact file is fine
    mutate, entry = _STRUCTURAL[case]
    mutate(data)
    with pytest.raises(AnnotationError, match="^ann.json: " + entry):
        check_coco_annotations(data, "ann.json")
