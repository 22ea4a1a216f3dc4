"""The grounding report's phrase groups (tools/synthetic_grounding.py), by hand."""
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))


def test_phrase_groups_and_shared_shapes_by_hand(tmp_path):
    from synthetic_grounding import mark_shared_shapes, phrase_breakdown

    (tmp_path / "annotations").mkdir()
    # image 1 holds two stars (category id 4 -> contiguous 1) and a moon (id 9 -> 2); image 2 one star
    (tmp_path / "annotations" / "grounding_test.json").write_text(json.dumps(
        {"images": [{"id": 10, "original_img_id": 1}, {"id": 11, "original_img_id": 1},
                    {"id": 12, "original_img_id": 2}]}))
    (tmp_path / "annotations" / "instances_test.json").write_text(json.dumps(
        {"categories": [{"id": 1, "name": "circle"}, {"id": 4, "name": "star"}, {"id": 9, "name": "moon"}],
         "annotations": [{"image_id": 1, "category_id": 4}, {"image_id": 1, "category_id": 4},
                         {"image_id": 1, "category_id": 9}, {"image_id": 2, "category_id": 4}]}))
    rows = [{"image_id": 10, "phrase": "a red star", "categories": [1], "boxes": 1, "novel": False, "rank": 0},
            {"image_id": 10, "phrase": "a blue star", "categories": [1], "boxes": 1, "novel": False, "rank": 3},
            {"image_id": 11, "phrase": "two stars", "categories": [1], "boxes": 2, "novel": False, "rank": None},
            {"image_id": 11, "phrase": "a Blue moon", "categories": [2], "boxes": 1, "novel": True, "rank": 0},
            {"image_id": 12, "phrase": "a star", "categories": [1], "boxes": 1, "novel": False, "rank": 1}]
    mark_shared_shapes(rows, str(tmp_path))
    assert [r["shared"] for r in rows] == [True, True, False, False, False]
    g = phrase_breakdown(rows, ["red", "blue"])
    assert g["all"]["phrases"] == 5 and g["all"]["R@1"] == 40.0 and g["all"]["R@5"] == 80.0
    assert g["novel + colour"]["R@1"] == 100.0 and g["colour"]["phrases"] == 3
    assert g["shape shared"]["R@1"] == 50.0 and g["plural"]["R@10"] == 0.0
    assert g["base"]["phrases"] == 4 and math.isclose(g["base"]["R@1"], 25.0)
