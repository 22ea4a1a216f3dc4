import json

import pytest

from regionclip_d2.data.vocabularies import (
    BUILTIN_VOCABULARIES,
    COCO_OVD_BASE,
    COCO_OVD_NOVEL,
    VocabularyError,
    load_vocabulary,
    lvis_categories,
    prompt_name,
)


@pytest.mark.parametrize("name,size", [("coco", 80), ("coco_ovd_base", 48), ("coco_ovd_novel", 17),
                                       ("coco_ovd_all", 65), ("lvis", 1203)])
def test_builtin_sizes(name, size):
    names = load_vocabulary(name)
    assert len(names) == size == len(set(names))


def test_coco_ovd_split():
    base, novel, allv = (set(load_vocabulary(n)) for n in ("coco_ovd_base", "coco_ovd_novel", "coco_ovd_all"))
    assert not base & novel and base | novel == allv
    assert set(COCO_OVD_BASE) == base and set(COCO_OVD_NOVEL) == novel  # every name exists in COCO
    coco = load_vocabulary("coco")
    assert load_vocabulary("coco_ovd_all") == [n for n in coco if n in allv]  # COCO order kept
    assert "cat" in novel and "person" in base and "traffic light" not in allv


def test_lvis_frequencies():
    cats = lvis_categories()
    freq = {c["frequency"] for c in cats}
    assert freq == {"r", "c", "f"}
    assert sum(c["frequency"] == "r" for c in cats) == 337  # LVIS v1: 337 rare, 461 common, 405 frequent
    assert sum(c["frequency"] == "c" for c in cats) == 461
    assert [c["id"] for c in cats] == list(range(1, 1204))


def test_files_and_strings(tmp_path):
    txt = tmp_path / "v.txt"
    txt.write_text("# my classes\ncat\n\n red star \n")
    assert load_vocabulary(str(txt)) == ["cat", "red star"]
    js = tmp_path / "v.json"
    js.write_text(json.dumps([{"name": "cat"}, {"name": "dog"}]))
    assert load_vocabulary(str(js)) == ["cat", "dog"]
    coco = tmp_path / "c.json"
    coco.write_text(json.dumps({"categories": [{"id": 2, "name": "b"}, {"id": 1, "name": "a"}]}))
    assert load_vocabulary(str(coco)) == ["a", "b"]
    assert load_vocabulary("cat, dog ,ring") == ["cat", "dog", "ring"]
    assert load_vocabulary(["x"]) == ["x"]


def test_errors(tmp_path):
    with pytest.raises(VocabularyError, match="empty"):
        load_vocabulary("")
    with pytest.raises(VocabularyError, match="empty"):
        load_vocabulary([])
    with pytest.raises(VocabularyError, match="duplicate"):
        load_vocabulary("cat,dog,cat")
    with pytest.raises(VocabularyError, match="position \\[1\\]"):
        load_vocabulary("cat,,dog")
    with pytest.raises(VocabularyError, match="unknown vocabulary 'coconut'"):
        load_vocabulary("coconut")
    with pytest.raises(VocabularyError, match="does not exist"):
        load_vocabulary(str(tmp_path / "nope.txt"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(VocabularyError, match="not valid JSON"):
        load_vocabulary(str(bad))


def test_prompt_name():
    assert prompt_name("traffic_light") == "traffic light"
    assert prompt_name("wall-other-merged") == "wall"
    assert set(BUILTIN_VOCABULARIES) == {"coco", "coco_ovd_base", "coco_ovd_novel", "coco_ovd_all", "lvis"}
