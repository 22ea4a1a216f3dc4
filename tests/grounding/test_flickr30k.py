"""Flickr30k Entities -> MDETR format, on a hand-written sample in the data set's own layout."""
import open_clip
import pytest

from regionclip_d2.grounding.data import load_grounding_json
from regionclip_d2.grounding.flickr30k import convert_flickr30k_entities, parse_sentence

SENTENCES = """[/EN#18/people A man] with [/EN#19/clothing pierced ears] is wearing [/EN#20/clothing glasses] .
[/EN#18/people A man] looks at [/EN#0/notvisual something]  in [/EN#21/scene the street] .
[/EN#18/people/other The  man] and [/EN#18/people him] again
"""
XML = """<annotation><filename>100.jpg</filename><size><width>333</width><height>500</height><depth>3</depth></size>
<object><name>18</name><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>110</xmax><ymax>220</ymax></bndbox></object>
<object><name>19</name><name>20</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>5</ymax></bndbox>
</object>
<object><name>18</name><bndbox><xmin>200</xmin><ymin>300</ymin><xmax>249</xmax><ymax>399</ymax></bndbox></object>
<object><name>21</name><nobndbox>0</nobndbox><scene>1</scene></object>
</annotation>
"""


def test_parse_sentence():
    caption, phrases = parse_sentence(SENTENCES.splitlines()[1])
    assert caption == "A man looks at something in the street ."
    assert [(caption[p["start"]:p["end"]], p["entity"], p["types"]) for p in phrases] == [
        ("A man", "18", ["people"]), ("something", "0", ["notvisual"]), ("the street", "21", ["scene"])]
    caption, phrases = parse_sentence(SENTENCES.splitlines()[2])
    assert caption == "The man and him again" and phrases[0]["types"] == ["people", "other"]


@pytest.fixture
def flickr(tmp_path):
    for d in ("Sentences", "Annotations", "images"):
        (tmp_path / d).mkdir()
    (tmp_path / "Sentences" / "100.txt").write_text(SENTENCES)
    (tmp_path / "Annotations" / "100.xml").write_text(XML)
    (tmp_path / "images" / "100.jpg").write_bytes(b"")
    (tmp_path / "val.txt").write_text("100\n")
    return tmp_path


def test_convert_and_read_back(flickr):
    out = str(flickr / "val.json")
    assert convert_flickr30k_entities(str(flickr), "val", out) == {"images": 1, "captions": 3, "annotations": 8}
    dicts = load_grounding_json(out, str(flickr / "images"), tokenizer=open_clip.SimpleTokenizer())
    first, second, third = dicts
    assert first["caption"] == "A man with pierced ears is wearing glasses ."
    named = [(first["caption"][s:e], a["bbox"]) for a in first["annotations"] for s, e in a["tokens_positive"]]
    assert named == [("A man", [10.0, 20.0, 100.0, 200.0]), ("A man", [199.0, 299.0, 50.0, 100.0]),
                     ("pierced ears", [0.0, 0.0, 10.0, 5.0]), ("glasses", [0.0, 0.0, 10.0, 5.0])]
    assert [a["phrase_ids"] for a in first["annotations"]] == [0, 0, 1, 2]
    assert first["tokens_positive_eval"] == [[[0, 5]], [[11, 23]], [[35, 42]]]
    # notvisual and scene-without-box entities get no box; a man's two boxes do
    assert [second["caption"][s:e] for a in second["annotations"] for s, e in a["tokens_positive"]] == ["A man"] * 2
    # one entity named twice in a caption: each of its boxes points at both phrases
    assert third["annotations"][0]["tokens_positive"] == [[0, 7], [12, 15]]
    assert third["annotations"][0]["positive_tokens"] == [1, 2, 4]  # <sot> the man and him again <eot>
    assert [d["original_img_id"] for d in dicts] == [100] * 3 and [d["sentence_id"] for d in dicts] == [0, 1, 2]


def test_missing_split_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="Sentences/, Annotations/"):
        convert_flickr30k_entities(str(tmp_path), "train", str(tmp_path / "x.json"))
