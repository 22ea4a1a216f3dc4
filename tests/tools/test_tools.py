"""Command-line tools, run as a user runs them."""
import json
import os
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, env=env, **kw)



def _tiny_demo(inp, out, tiny_clip_config, vocabulary, threshold, min_size, regions):
    """tools/demo.py's command line on the tiny random CLIP."""
    return ["tools/demo.py", "--input", str(inp), "--output", str(out), "--vocabulary", "custom",
            "--custom-vocabulary", vocabulary, "--confidence-threshold", str(threshold), "--random-weights",
            "--opts", "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config, "MODEL.CLIP.TEXT_EMB_DIM", "64",
            "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "4", "MODEL.CLIP.PROMPT_TEMPLATES", "single",
            "INPUT.MIN_SIZE_TEST", str(min_size), "MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST", str(regions)]

def test_embed_vocabulary(tiny_clip, tiny_clip_config, tmp_path):
    weights = tmp_path / "clip.pth"
    torch.save(tiny_clip.state_dict(), weights)
    out = tmp_path / "voc.pth"
    r = run(["tools/embed_vocabulary.py", "--vocabulary", "coco_ovd_novel", "--model-config", tiny_clip_config,
             "--clip-weights", str(weights), "--templates", "single", "--output", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    emb = torch.load(out, weights_only=True)
    assert emb.shape == (17, 64)
    assert (tmp_path / "voc.txt").read_text().splitlines()[0] == "airplane"
    # the same function embeds inside the detector: identical numbers
    from regionclip_d2.checkpoint import load_clip_weights
    from regionclip_d2.modeling.text import build_language_encoder, embed_class_names

    enc = build_language_encoder("", tiny_clip_config)
    load_clip_weights(str(weights), lang_encoder=enc)
    from regionclip_d2 import load_vocabulary

    torch.testing.assert_close(embed_class_names(load_vocabulary("coco_ovd_novel"), enc, templates="single"), emb)


def test_embed_vocabulary_errors(tmp_path):
    r = run(["tools/embed_vocabulary.py", "--vocabulary", "coco", "--output", str(tmp_path / "x.pth")])
    assert r.returncode != 0 and "--clip-weights is required" in r.stderr
    r = run(["tools/embed_vocabulary.py", "--vocabulary", "cat,cat", "--random-weights", "--output",
             str(tmp_path / "x.pth")])
    assert r.returncode != 0 and "duplicate class names" in r.stderr


def test_demo_writes_images_and_json(tiny_clip_config, tmp_path):
    from PIL import Image

    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(inp / "rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (50, 50), dtype=np.uint8)).save(inp / "gray.png")
    Image.fromarray(rng.integers(0, 255, (40, 70, 4), dtype=np.uint8), mode="RGBA").save(inp / "rgba.png")
    (inp / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    r = run(_tiny_demo(inp, out, tiny_clip_config, "red star,blue ring,moon", threshold=0, min_size=96, regions=50))
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "WEIGHTS ARE RANDOM" in log
    assert "skipping" in log and "broken.jpg" in log
    for stem, (h, w) in {"rgb_jpg": (60, 80), "gray_png": (50, 50), "rgba_png": (40, 70)}.items():
        assert (out / f"{stem}.jpg").is_file()
        data = json.loads((out / f"{stem}.json").read_text())
        assert data["random_weights"] is True and (data["height"], data["width"]) == (h, w)
        assert data["detections"], stem
        for d in data["detections"]:
            assert d["class_name"] in {"red star", "blue ring", "moon"}
            x0, y0, x1, y1 = d["box_xyxy"]
            assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h


def test_demo_refuses_missing_weights_and_inputs(tmp_path):
    r = run(["tools/demo.py", "--input", str(tmp_path / "none.jpg"), "--output", str(tmp_path / "o")])
    assert r.returncode != 0 and "not a file, folder or glob" in r.stderr
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(img)
    r = run(["tools/demo.py", "--input", str(img), "--output", str(tmp_path / "o")])
    assert r.returncode != 0 and "--random-weights" in r.stderr


def test_demo_checks_inputs_first_and_never_overwrites(tiny_clip_config, tmp_path):
    from PIL import Image

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from demo import output_names

    # every input unreadable: a one-line error before any model work, non-zero exit
    (tmp_path / "x.jpg").write_text("a text file named like an image")
    good = tmp_path / "t.png"
    Image.new("RGB", (40, 40)).save(good)
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:30])
    r = run(["tools/demo.py", "--input", str(tmp_path / "x.jpg"), str(tmp_path / "trunc.png"), "--output",
             str(tmp_path / "o"), "--random-weights"], timeout=60)
    assert r.returncode != 0
    assert "none of the 2 input(s) is a readable image" in r.stderr and "Traceback" not in r.stderr
    # a known user error is one line, not a traceback
    r = run(["tools/demo.py", "--input", str(good), "--output", str(tmp_path / "o"), "--vocabulary", "custom",
             "--custom-vocabulary", "cat,cat", "--random-weights"], timeout=60)
    assert r.returncode != 0 and "duplicate class names" in r.stderr and "Traceback" not in r.stderr
    # output names: a.png and a.jpg do not collide; an output never takes an input's path
    d = tmp_path / "imgs"
    d.mkdir()
    files = [str(d / "a.png"), str(d / "a.jpg"), str(tmp_path / "a.png"), str(d / "b_png.jpg")]
    stems = output_names(files, str(d))
    assert len(set(stems)) == 4
    outputs = {os.path.join(str(d), s + e) for s in stems for e in (".jpg", ".json")}
    assert not outputs & set(files)


def test_demo_reads_unusual_pixel_modes_and_applies_exif(tiny_clip_config, tmp_path):
    """The demo reads as training and evaluation do: 16-bit scaled (detectron2 alone: white),
    palette, CMYK and grey-alpha images in their colours; an EXIF-rotated photo upright."""
    from PIL import Image

    inp = tmp_path / "in"
    inp.mkdir()
    h, w = 64, 512  # 512 wide: the demo draws at scale 1, so its output image is the input image
    Image.fromarray(np.full((h, w), 257 * 100, np.uint16)).save(inp / "sixteen.png")
    pal = Image.new("P", (w, h), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50])
    pal.save(inp / "palette.png", transparency=1)
    Image.new("CMYK", (w, h), (0, 255, 255, 0)).save(inp / "cmyk.jpg", quality=100)
    Image.fromarray(np.stack([np.full((h, w), 100, np.uint8), np.zeros((h, w), np.uint8)], 2), mode="LA").save(
        inp / "la.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 512 x 64, shown 64 wide and 512 tall
    Image.new("RGB", (w, h), (0, 0, 255)).save(inp / "rot.jpg", quality=100, exif=exif.tobytes())
    out = tmp_path / "out"
    r = run(_tiny_demo(inp, out, tiny_clip_config, "red star,moon", threshold=2, min_size=64, regions=20))
    assert r.returncode == 0, r.stderr[-3000:]
    expected = {"sixteen_png": (100, 100, 100), "palette_png": (200, 100, 50), "cmyk_jpg": (255, 0, 0),
                "la_png": (100, 100, 100), "rot_jpg": (0, 0, 255)}
    for stem, colour in expected.items():
        data = json.loads((out / f"{stem}.json").read_text())
        size = (data["height"], data["width"])
        assert size == ((w, h) if stem == "rot_jpg" else (h, w)), (stem, size)
        drawn = np.asarray(Image.open(out / f"{stem}.jpg").convert("RGB"))
        assert drawn.shape[:2] == size, stem
        centre = drawn[size[0] // 4: 3 * size[0] // 4, size[1] // 4: 3 * size[1] // 4].reshape(-1, 3).mean(0)
        assert np.abs(centre - np.array(colour)).max() <= 6, (stem, centre)


def test_demo_merges_the_labels_of_one_box():
    """Two phrases scoring the same region are one box with both labels, best first, not two
    labels printed over each other (tools/demo.py and the web app draw through this)."""
    from regionclip_d2.api.results import merge_same_box_labels

    boxes = [[1.0, 2.0, 30.0, 40.0], [5.0, 5.0, 9.0, 9.0], [1.0, 2.0, 30.0, 40.000001]]
    out_boxes, out_labels, ids = merge_same_box_labels(boxes, ["white moon 0.59", "star 0.55", "orange moon 0.58"],
                                                       [3, 1, 4])
    assert out_boxes == [[1.0, 2.0, 30.0, 40.0], [5.0, 5.0, 9.0, 9.0]]
    assert out_labels == ["white moon 0.59 | orange moon 0.58", "star 0.55"] and ids == [3, 1]
    assert merge_same_box_labels(np.zeros((0, 4)), []) == ([], [], [])
