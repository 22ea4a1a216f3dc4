"""Grounding data: the MDETR-style reader on a hand-written file (positive tokens by hand),
its errors, detectron2 registration, and detection data through the class prompt."""
import copy
import json

import open_clip
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from regionclip_d2.grounding.data import (
    GroundingDataError,
    detection_to_grounding,
    grounding_positive_map,
    load_grounding_json,
    register_grounding_dataset,
)
from regionclip_d2.grounding.tokens import PromptTooLongError

# MDETR's layout: two captions of one image (two entries), one of another
SAMPLE = {
    "images": [
        {"id": 1, "file_name": "a.jpg", "height": 40, "width": 60, "caption": "A man in a red shirt holds two cups.",
         "original_img_id": 10, "sentence_id": 0, "dataset_name": "flickr",
         "tokens_positive_eval": [[[0, 5]], [[9, 20]], [[27, 35]]]},
        {"id": 2, "file_name": "a.jpg", "height": 40, "width": 60, "caption": "Someone  holds CUPS",
         "original_img_id": 10, "sentence_id": 1, "dataset_name": "flickr"},
        {"id": 3, "file_name": "b.jpg", "height": 40, "width": 60, "caption": "a dog, a dog and a café"},
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 20], "tokens_positive": [[0, 5]],
         "phrase_ids": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [3, 4, 10, 10], "tokens_positive": [[9, 20]],
         "phrase_ids": 1},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [30, 5, 5, 5], "tokens_positive": [[27, 35]],
         "phrase_ids": 2},
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [40, 5, 5, 5], "tokens_positive": [[27, 35]],
         "phrase_ids": 2},
        {"id": 5, "image_id": 2, "category_id": 1, "bbox": [1, 2, 10, 20], "tokens_positive": [[0, 7]]},
        {"id": 6, "image_id": 2, "category_id": 1, "bbox": [30, 5, 5, 5], "tokens_positive": [[15, 19]]},
        {"id": 7, "image_id": 3, "category_id": 1, "bbox": [0, 0, 9, 9], "tokens_positive": [[0, 5], [7, 12]]},
        {"id": 8, "image_id": 3, "category_id": 1, "bbox": [9, 9, 9, 9], "tokens_positive": [[17, 23]]},
    ],
    "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
}


@pytest.fixture(scope="module")
def tok():
    return open_clip.SimpleTokenizer()


def _write(tmp_path, data, name="g.json"):
    (tmp_path / "images").mkdir(exist_ok=True)
    for f in ("a.jpg", "b.jpg"):
        (tmp_path / "images" / f).write_bytes(b"")
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path), str(tmp_path / "images")


def test_reads_mdetr_format_with_positive_tokens_by_hand(tmp_path, tok):
    dicts = load_grounding_json(*_write(tmp_path, SAMPLE), tokenizer=tok)
    assert [d["image_id"] for d in dicts] == [1, 2, 3]
    d = dicts[0]
    assert d["file_name"].endswith("images/a.jpg") and d["caption"] == SAMPLE["images"][0]["caption"]
    assert d["original_img_id"] == 10 and d["sentence_id"] == 0 and d["dataset_name"] == "flickr"
    assert d["tokens_positive_eval"] == [[[0, 5]], [[9, 20]], [[27, 35]]]
    a = d["annotations"]
    assert [x["bbox_mode"] for x in a] == [BoxMode.XYWH_ABS] * 4 and a[0]["bbox"] == [1.0, 2.0, 10.0, 20.0]
    assert [x["phrase_ids"] for x in a] == [0, 1, 2, 2] and {x["category_id"] for x in a} == {0}
    # <sot> a man in a red shirt holds two cups . <eot>
    #   0   1  2  3  4  5   6     7    8   9   10  11
    assert [x["positive_tokens"] for x in a] == [[1, 2], [4, 5, 6], [8, 9], [8, 9]]
    assert d["num_positions"] == 12
    pm = grounding_positive_map(d, 77)
    assert pm.shape == (4, 77) and pm.sum().item() == 9 and pm[1, 4:7].tolist() == [1, 1, 1]
    torch.testing.assert_close(grounding_positive_map(d, 77, normalize=True).sum(1), torch.ones(4))
    # double space and capitals: "Someone  holds CUPS" -> <sot> someone holds cups <eot>
    assert [x["positive_tokens"] for x in dicts[1]["annotations"]] == [[1], [3]]
    # two spans for one box (a repeated phrase); <sot> a dog , a dog and a café <eot> (café: one token)
    assert [x["positive_tokens"] for x in dicts[2]["annotations"]] == [[1, 2, 4, 5], [7, 8]]
    assert [x["tokens_positive"] for x in dicts[2]["annotations"]] == [[[0, 5], [7, 12]], [[17, 23]]]
    # without a tokenizer: spans only
    plain = load_grounding_json(*_write(tmp_path, SAMPLE))
    assert "positive_tokens" not in plain[0]["annotations"][0] and "num_positions" not in plain[0]


def _broken(change):
    data = copy.deepcopy(SAMPLE)
    change(data)
    return data


@pytest.mark.parametrize("change, message", [
    (lambda d: d["images"][1].pop("caption"), r"images\[1\] \(id 2, 'a.jpg'\) has no 'caption'"),
    (lambda d: d["images"][2].update(caption="  "), r"images\[2\] .* has an empty caption"),
    (lambda d: d["annotations"][0].pop("tokens_positive"), r"annotations\[0\] .* lacks 'tokens_positive'"),
    (lambda d: d["annotations"][1].update(tokens_positive=[[30, 99]]),
     r"annotations\[1\] .*span \[30, 99\) lies outside the caption .* \(36 characters\)"),
    (lambda d: d["annotations"][1].update(tokens_positive=[[9, 9]]), r"span \[9, 9\) is empty"),
    (lambda d: d["annotations"][1].update(tokens_positive=[[9]]), r"is not \[start, end\) \(two integers\)"),
    (lambda d: d["annotations"][1].update(tokens_positive=[[1.0, 5.0]]), r"is not \[start, end\)"),
    (lambda d: d["annotations"][1].update(tokens_positive=[[5, 6]]), r"span \[5, 6\) .* is only whitespace"),
    (lambda d: d["annotations"][1].update(tokens_positive=[[11, 18]]),
     r"span \[11, 18\) = 'red shi' starts or ends inside a word .* strict_spans=False"),
    (lambda d: d["annotations"][1].update(tokens_positive=[[12, 20]]), r"span \[12, 20\) = 'ed shirt' starts or ends"),
    (lambda d: d["images"][0].update(tokens_positive_eval=[[[0, 50]]]), r"tokens_positive_eval\[0\]\[0\]: span"),
    (lambda d: d["annotations"][0].update(image_id=99), r"refers to image_id 99"),
])
def test_errors_name_the_entry_and_the_fix(tmp_path, change, message):
    with pytest.raises((GroundingDataError, ValueError), match=message):
        load_grounding_json(*_write(tmp_path, _broken(change)))


def test_handled_cases(tmp_path, tok, caplog):
    # spans that cut words are accepted on request; an annotation with no span is dropped (counted)
    data = _broken(lambda d: (d["annotations"][1].update(tokens_positive=[[11, 18]]),
                              d["annotations"][2].update(tokens_positive=[])))
    dicts = load_grounding_json(*_write(tmp_path, data), strict_spans=False, tokenizer=tok)
    assert len(dicts[0]["annotations"]) == 3 and dicts[0]["annotations"][1]["positive_tokens"] == [5, 6]
    assert "1 annotations with an empty tokens_positive (dropped)" in caplog.text
    # a caption longer than the text context: an error by default, dropped on request
    small = open_clip.SimpleTokenizer(context_length=8)
    path, root = _write(tmp_path, SAMPLE)
    with pytest.raises(PromptTooLongError, match=r"image entry 1 .* needs 12 token positions .* on_too_long='skip'"):
        load_grounding_json(path, root, tokenizer=small)
    kept = load_grounding_json(path, root, tokenizer=small, on_too_long="skip")
    assert [d["image_id"] for d in kept] == [2]  # "someone holds cups" fits 8; the others do not
    # a missing image file: its entries are dropped, as in register_coco_format
    (tmp_path / "images" / "b.jpg").unlink()
    assert [d["image_id"] for d in load_grounding_json(path, root)] == [1, 2]


def test_registered_in_detectron2(tmp_path, tok):
    path, root = _write(tmp_path, SAMPLE)
    name = register_grounding_dataset("test_grounding_sample", path, root, tokenizer=tok)
    try:
        assert MetadataCatalog.get(name).evaluator_type == "grounding"
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == 3 and dicts[0]["annotations"][0]["positive_tokens"] == [1, 2]
        assert MetadataCatalog.get(name).thing_classes == ["object"]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        register_grounding_dataset("x", str(tmp_path / "nope.json"), root)


def test_detection_data_through_the_class_prompt(tok):
    names = ["circle", "square", "red mug", "traffic_light", "star", "moon"]
    dets = [{"file_name": "x.png", "image_id": 1, "height": 10, "width": 10, "annotations": [
        {"bbox": [0, 0, 5, 5], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 3},
        {"bbox": [1, 1, 5, 5], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},
        {"bbox": [2, 2, 5, 5], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 3}]},
        {"file_name": "y.png", "image_id": 2, "height": 10, "width": 10, "annotations": []}]
    (one,) = detection_to_grounding(dets[:1], names, tok)
    assert one["caption"] == "circle. square. red mug. traffic light. star. moon."
    assert one["class_ids"] == list(range(6)) and one["prompt_index"] == 0 and one["file_name"] == "x.png"
    assert [a["tokens_positive"] for a in one["annotations"]] == [[[25, 38]], [[0, 6]], [[25, 38]]]
    assert [a["category_id"] for a in one["annotations"]] == [3, 0, 3]
    # <sot> circle . square . red mug . traffic light . star . moon . <eot>
    assert [a["positive_tokens"] for a in one["annotations"]] == [[8, 9], [1], [8, 9]]
    assert dets[0]["annotations"][0].get("tokens_positive") is None  # the input is not modified
    # chunked: context 8 holds "circle. square. red mug." (8 positions), then the rest
    chunks = detection_to_grounding(dets, names, tok, context_length=8)
    assert [(g["image_id"], g["prompt_index"]) for g in chunks] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    by_prompt = {g["prompt_index"]: g for g in chunks if g["image_id"] == 1}
    for g in by_prompt.values():
        assert g["num_positions"] <= 8
        for a in g["annotations"]:
            (s, e), = a["tokens_positive"]
            assert g["caption"][s:e] == names[a["category_id"]].replace("_", " ")
            assert a["category_id"] in g["class_ids"] and max(a["positive_tokens"]) < g["num_positions"] - 1
    assert sum(len(g["annotations"]) for g in by_prompt.values()) == 3
    kept = detection_to_grounding(dets, names, tok, context_length=8, keep_empty=False)
    assert [(g["image_id"], len(g["annotations"])) for g in kept] == [(1, 1), (1, 2)]
    bad = [{"file_name": "z.png", "annotations": [{"bbox": [0, 0, 1, 1], "category_id": 6}]}]
    with pytest.raises(GroundingDataError, match="category_id 6, not an index into the 6 class names"):
        detection_to_grounding(bad, names, tok)
