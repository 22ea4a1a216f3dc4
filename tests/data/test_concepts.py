"""The concept pool: caption parsing, streaming readers, bad input, tools/extract_concepts.py."""
import collections
import gzip
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from regionclip_d2.data import caption_files as C
from regionclip_d2.data import json_stream
from regionclip_d2.data.concepts import (
    CaptionFormatError,
    build_concept_pool,
    count_concepts,
    detect_format,
    filter_concepts,
    parse_caption,
    read_captions,
    read_concepts,
    singularize,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (file name, caption) fixture; the expected concepts are counted once per caption.
CAPTIONS = [
    ("a.jpg", "Two red stars next to a blue ring."),
    ("a.jpg", "A red star above the moon."),
    ("b.jpg", "The blue ring is on a wooden table."),
    ("c.jpg", "Three geese near a traffic light."),
    ("c.jpg", "A dog chasing a dog."),
]
EXPECTED = {
    "star": 2, "red star": 2, "ring": 2, "blue ring": 2, "moon": 1, "table": 1, "wooden table": 1,
    "goose": 1, "light": 1, "traffic light": 1, "dog": 1,
}


def write_coco(path, records, annotations_first=False):
    names = sorted({f for f, _ in records})
    images = [{"id": i + 1, "file_name": n, "height": 20, "width": 30} for i, n in enumerate(names)]
    anns = [{"id": k, "image_id": names.index(f) + 1, "caption": c} for k, (f, c) in enumerate(records)]
    data = {"info": {"year": 2017, "nested": [1, [2, 3]]}, "licenses": [{"id": 1, "name": "x"}]}
    data.update({"annotations": anns, "images": images} if annotations_first else {"images": images,
                                                                                   "annotations": anns})
    path.write_text(json.dumps(data, indent=1))
    return str(path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps({"file_name": f, "caption": c}) + "\n" for f, c in records))
    return str(path)


def write_tsv(path, records):
    path.write_text("".join(f"{f}\t{c}\n" for f, c in records))
    return str(path)


WRITERS = {"coco": (write_coco, "caps.json"), "jsonl": (write_jsonl, "caps.jsonl"), "tsv": (write_tsv, "caps.tsv")}


def test_parse_caption_rules():
    assert parse_caption("Two red stars next to a blue ring.") == ["star", "red star", "ring", "blue ring"]
    assert parse_caption("A dog chasing a dog.") == ["dog"]  # once per caption
    assert parse_caption("Three geese near a traffic light.") == ["goose", "light", "traffic light"]
    assert parse_caption("TWO RED STARS") == ["star", "red star"]  # lower-cased
    assert parse_caption("") == [] and parse_caption("12 , 34 !") == []


def test_singular():
    assert singularize("geese") == "goose"
    assert singularize("men") == "man" and singularize("teeth") == "tooth"
    assert singularize("buses") == "bus" and singularize("t-shirts") == "t-shirt"
    assert singularize("pants") == "pants" and singularize("scissors") == "scissors"


def test_counts_on_fixture():
    stats = {}
    counts = count_concepts(CAPTIONS, progress=False, stats=stats)
    assert counts == collections.Counter(EXPECTED)
    assert stats == {"parsed": 5, "parse_errors": 0}
    assert count_concepts([c for _, c in CAPTIONS], progress=False) == counts  # plain strings too


def test_workers_match_single_process():
    caps = [c for _, c in CAPTIONS] * 7 + ["A man riding a horse on the beach.", "Traffic lights at a busy corner."]
    single = count_concepts(caps, workers=0, progress=False)
    multi = count_concepts(iter(caps), workers=2, progress=False, chunk_size=3)
    assert multi == single and single["star"] == 14


def test_min_count_filter():
    counts = collections.Counter(EXPECTED)
    assert filter_concepts(counts, 2) == [("blue ring", 2), ("red star", 2), ("ring", 2), ("star", 2)]
    assert len(filter_concepts(counts, 1)) == len(EXPECTED) and filter_concepts(counts, 3) == []


@pytest.mark.parametrize("fmt", ["coco", "jsonl", "tsv"])
def test_readers_stream_each_format(fmt, tmp_path, monkeypatch):
    monkeypatch.setattr(json_stream, "JSON_CHUNK_BYTES", 7)  # tiny reads: values straddle chunk boundaries
    writer, name = WRITERS[fmt]
    path = writer(tmp_path / name, CAPTIONS)
    assert detect_format(path) == fmt
    stats = {}
    it = read_captions(path, stats=stats)
    assert not isinstance(it, (list, tuple))  # a generator
    assert list(it) == CAPTIONS
    assert list(read_captions(path, fmt=fmt)) == CAPTIONS
    assert stats["records"] == stats["captions"] == 5 and stats["bad_records"] == 0
    pool, counts, _ = build_concept_pool([path], min_count=1, progress=False)
    assert dict(pool) == EXPECTED


def test_coco_annotations_before_images_and_gzip(tmp_path, monkeypatch):
    monkeypatch.setattr(json_stream, "JSON_CHUNK_BYTES", 5)
    path = write_coco(tmp_path / "c.json", CAPTIONS, annotations_first=True)
    recs = list(C.iter_caption_records(path))
    assert [(r["file_name"], r["caption"]) for r in recs] == CAPTIONS
    assert recs[0]["image_id"] == 1 and (recs[0]["height"], recs[0]["width"]) == (20, 30)
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(open(write_jsonl(tmp_path / "x.jsonl", CAPTIONS)).read())
    assert list(read_captions(str(gz))) == CAPTIONS


def test_bad_input_counted_not_fatal(tmp_path):
    good = "A red star above the moon."
    lines = [
        b'{"file_name": "a.jpg", "caption": "A red star above the moon."}',
        b'{"file_name": "b.jpg", "caption": "   "}',  # empty
        b'{"file_name": "c.jpg", "caption": "A blue ring on a caf\xe9 table \xff."}',  # not UTF-8
        '{"file_name": "d.jpg", "caption": "\u732b\u304c\u6905\u5b50\u306e\u4e0a\u306b\u3044\u308b"}'.encode(),
        b'{"file_name": "e.jpg", "caption": "Un chien noir court sur la plage"}',  # French
        b'{"file_name": "f.jpg", "caption": "' + b"a dog " * 300 + b'"}',  # too long
        b'{"file_name": "g.jpg", "caption": 12}',
        b"{not json",
        b"",
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    stats = {}
    got = list(read_captions(str(path), stats=stats))
    assert [f for f, _ in got] == ["a.jpg", "c.jpg"] and got[0][1] == good
    assert "\ufffd" in got[1][1]
    assert stats == {"records": 8, "captions": 2, "empty": 1, "non_english": 2, "too_long": 1,
                     "bad_encoding": 1, "bad_records": 2, "unknown_image_id": 0}
    assert set(parse_caption(got[1][1])) >= {"ring", "blue ring"}

    tsv = tmp_path / "bad.tsv"
    tsv.write_bytes(b"a.jpg\tA red star above the moon.\nno tab here\nb.jpg\t\nc.jpg\tA blue \xfe ring.\n")
    stats = {}
    got = list(read_captions(str(tsv), stats=stats))
    assert [f for f, _ in got] == ["a.jpg", "c.jpg"]
    assert (stats["bad_records"], stats["empty"], stats["bad_encoding"]) == (1, 1, 1)


def test_format_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(read_captions(str(tmp_path / "missing.json")))
    odd = tmp_path / "caps.dat"
    odd.write_text("just some text\n")
    with pytest.raises(CaptionFormatError, match="--format"):
        list(read_captions(str(odd)))
    with pytest.raises(CaptionFormatError, match="unknown caption format"):
        list(read_captions(write_tsv(tmp_path / "x.tsv", CAPTIONS), fmt="csv"))
    nocaps = tmp_path / "n.json"
    nocaps.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(CaptionFormatError, match="no 'annotations'"):
        list(read_captions(str(nocaps)))
    broken = tmp_path / "b.json"
    broken.write_text('{"images": [], "annotations": [{"image_id": 1, "caption": "a dog"}, {"image_')
    with pytest.raises(CaptionFormatError, match="not valid COCO"):
        list(read_captions(str(broken)))


# ------------------------------------------------------------------------------------------------
# tools/extract_concepts.py
# ------------------------------------------------------------------------------------------------
def _tool():
    spec = importlib.util.spec_from_file_location("extract_concepts", os.path.join(ROOT, "tools",
                                                                                   "extract_concepts.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_no_embed(tmp_path, capsys):
    caps = write_jsonl(tmp_path / "caps.jsonl", CAPTIONS)
    out = tmp_path / "out"
    assert _tool().main(["--captions", caps, "--min-count", "2", "--no-embed", "--output-dir", str(out),
                         "--quiet"]) == 0
    lines = (out / "concepts.txt").read_text().splitlines()
    assert lines == ["blue ring\t2", "red star\t2", "ring\t2", "star\t2"]
    assert read_concepts(str(out / "concepts.txt"))[0] == ("blue ring", 2)
    assert json.loads((out / "concept_stats.json").read_text())["stats"]["captions"] == 5
    assert not (out / "concept_embeddings.pth").exists()
    # --max-captions reads the first N captions only
    assert _tool().main(["--captions", caps, "--min-count", "1", "--no-embed", "--output-dir", str(out),
                         "--max-captions", "1", "--quiet"]) == 0
    assert {ln.split("\t")[0] for ln in (out / "concepts.txt").read_text().splitlines()} == \
        {"star", "red star", "ring", "blue ring"}
    assert json.loads((out / "concept_stats.json").read_text())["stats"]["captions"] == 1


def test_cli_errors(tmp_path, capsys):
    tool = _tool()
    caps = write_tsv(tmp_path / "caps.tsv", CAPTIONS)
    with pytest.raises(SystemExit):
        tool.main(["--captions", str(tmp_path / "nope.json"), "--no-embed", "--output-dir", str(tmp_path)])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(["--captions", caps, "--format", "csv", "--no-embed", "--output-dir", str(tmp_path)])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(["--captions", caps, "--output-dir", str(tmp_path)])
    assert "--clip-weights is required" in capsys.readouterr().err
    assert tool.main(["--captions", caps, "--no-embed", "--output-dir", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "no concept reaches --min-count 100" in err and "'star' (2)" in err
    assert not (tmp_path / "o" / "concepts.txt").exists()
    odd = tmp_path / "caps.dat"
    odd.write_text("no format\n")
    assert tool.main(["--captions", str(odd), "--no-embed", "--output-dir", str(tmp_path), "--quiet"]) == 1
    assert "cannot detect the caption format" in capsys.readouterr().err


def test_cli_help_runs_as_a_script():
    r = subprocess.run([sys.executable, "tools/extract_concepts.py", "--help"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    for opt in ("--captions", "--format", "--min-count", "--output-dir", "--workers", "--max-captions", "--model",
                "--model-config", "--clip-weights", "--templates", "--no-embed", "--random-weights"):
        assert opt in r.stdout


def test_cli_embeds_with_tiny_clip(tiny_clip, tiny_clip_config, tmp_path, capsys):
    weights = tmp_path / "clip.pth"
    torch.save(tiny_clip.state_dict(), weights)
    caps = write_coco(tmp_path / "caps.json", CAPTIONS)
    out = tmp_path / "out"
    assert _tool().main(["--captions", caps, "--min-count", "1", "--workers", "2", "--model-config",
                         tiny_clip_config, "--clip-weights", str(weights), "--templates", "single", "--output-dir",
                         str(out), "--device", "cpu", "--quiet"]) == 0
    assert "RANDOM" not in capsys.readouterr().err
    pool = read_concepts(str(out / "concepts.txt"))
    assert dict(pool) == EXPECTED and [n for _, n in pool] == sorted((n for _, n in pool), reverse=True)
    emb = torch.load(out / "concept_embeddings.pth", weights_only=True)
    assert emb.shape == (len(EXPECTED), 64)
    # the one shared embedding function gives the same numbers on the same names
    from regionclip_d2.checkpoint import load_clip_weights
    from regionclip_d2.modeling.text import build_language_encoder, embed_class_names

    enc = build_language_encoder("", tiny_clip_config)
    load_clip_weights(str(weights), lang_encoder=enc)
    torch.testing.assert_close(embed_class_names([c for c, _ in pool], enc, templates="single", use_cache=False),
                               emb)


def test_cli_random_weights_warns(tiny_clip_config, tmp_path, capsys):
    caps = write_tsv(tmp_path / "caps.tsv", CAPTIONS)
    out = tmp_path / "out"
    assert _tool().main(["--captions", caps, "--min-count", "2", "--model-config", tiny_clip_config,
                         "--random-weights", "--templates", "single", "--output-dir", str(out), "--quiet"]) == 0
    assert "RANDOM TEXT-ENCODER WEIGHTS" in capsys.readouterr().err
    assert torch.load(out / "concept_embeddings.pth", weights_only=True).shape == (4, 64)
