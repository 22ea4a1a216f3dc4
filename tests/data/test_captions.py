"""Image-caption data sets: registration, mapper, training loader, bad images."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from regionclip_d2 import get_regionclip_cfg
from regionclip_d2.data.captions import (
    BadImageError,
    CaptionDatasetMapper,
    build_caption_train_loader,
    load_caption_dicts,
    register_caption_dataset,
)
from regionclip_d2.data.loader import BadSampleError, SafeMappedDataset

SIZES = {"a.png": (40, 60), "b.png": (30, 50), "c.png": (36, 48)}  # (h, w): all landscape (one aspect group)
CAPTIONS = [("a.png", "A red star."), ("b.png", "A blue ring."), ("a.png", "Two red stars."),
            ("c.png", "A green moon."), ("b.png", "A ring on a table.")]


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for name, (h, w) in SIZES.items():
        arr = np.zeros((h, w, 3), dtype=np.uint8)
        arr[..., 0] = 200  # pure red (RGB)
        Image.fromarray(arr).save(root / name)
    return root


def _write(tmp_path, fmt, records):
    if fmt == "jsonl":
        path = tmp_path / "caps.jsonl"
        path.write_text("".join(json.dumps({"file_name": f, "caption": c}) + "\n" for f, c in records))
    elif fmt == "tsv":
        path = tmp_path / "caps.tsv"
        path.write_text("".join(f"{f}\t{c}\n" for f, c in records))
    else:
        names = sorted({f for f, _ in records})
        path = tmp_path / "caps.json"
        path.write_text(json.dumps({
            "images": [{"id": 10 + i, "file_name": n, "height": SIZES.get(n, (1, 1))[0],
                        "width": SIZES.get(n, (1, 1))[1]} for i, n in enumerate(names)],
            "annotations": [{"id": k, "image_id": 10 + names.index(f), "caption": c}
                            for k, (f, c) in enumerate(records)]}))
    return str(path)


def _cfg(*names):
    cfg = get_regionclip_cfg()
    cfg.merge_from_list(["DATASETS.TRAIN", tuple(names), "DATALOADER.NUM_WORKERS", 0, "SOLVER.IMS_PER_BATCH", 2,
                         "INPUT.MIN_SIZE_TRAIN", (32,), "INPUT.MAX_SIZE_TRAIN", 64, "INPUT.MIN_SIZE_TEST", 24,
                         "INPUT.MAX_SIZE_TEST", 64, "INPUT.FORMAT", "BGR"])
    return cfg


@pytest.mark.parametrize("fmt", ["coco", "jsonl", "tsv"])
def test_register_groups_captions(fmt, tmp_path, image_root):
    name = f"test_captions_{fmt}"
    register_caption_dataset(name, _write(tmp_path, fmt, CAPTIONS), str(image_root))
    dicts = DatasetCatalog.get(name)
    assert [d["file_name"] for d in dicts] == [str(image_root / n) for n in ("a.png", "b.png", "c.png")]
    assert dicts[0]["captions"] == ["A red star.", "Two red stars."]
    assert dicts[1]["captions"] == ["A blue ring.", "A ring on a table."]
    if fmt == "coco":
        assert [d["image_id"] for d in dicts] == [10, 11, 12] and (dicts[0]["height"], dicts[0]["width"]) == (40, 60)
    else:
        assert [d["image_id"] for d in dicts] == [0, 1, 2] and "height" not in dicts[0]
    assert MetadataCatalog.get(name).image_root == str(image_root)
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_register_errors(tmp_path, image_root):
    with pytest.raises(FileNotFoundError, match="caption file"):
        register_caption_dataset("x", str(tmp_path / "none.jsonl"), str(image_root))
    caps = _write(tmp_path, "jsonl", CAPTIONS)
    with pytest.raises(FileNotFoundError, match="image folder"):
        register_caption_dataset("x", caps, str(tmp_path / "nothere"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"file_name": "a.png", "caption": ""}\n')
    with pytest.raises(ValueError, match="no image with a caption"):
        load_caption_dicts(str(empty), str(image_root))


def test_mapper_resizes_and_picks_captions(tmp_path, image_root):
    d = {"file_name": str(image_root / "a.png"), "image_id": 0, "captions": ["one", "two", "three"]}
    train = CaptionDatasetMapper(_cfg(), is_train=True)
    seen = set()
    for _ in range(30):
        out = train(d)
        seen.add(out["caption"])
        assert out["captions"] == ["one", "two", "three"]
    assert seen == {"one", "two", "three"}  # random choice when training
    img = out["image"]
    assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 32, 48)  # shortest edge 40 -> 32
    assert (out["height"], out["width"]) == (40, 60)
    assert img[2].float().mean() > 150 and img[0].max() == 0  # BGR: red in channel 2
    test = CaptionDatasetMapper(_cfg(), is_train=False)
    out = test(d)
    assert out["caption"] == "one" and tuple(out["image"].shape) == (3, 24, 36)
    assert d["captions"] == ["one", "two", "three"] and "image" not in d  # input untouched
    # built from keyword arguments instead of a config
    from detectron2.data import transforms as T

    kw = CaptionDatasetMapper(is_train=False, augmentations=[T.ResizeShortestEdge(20, 100)], image_format="RGB")
    out = kw(d)
    assert tuple(out["image"].shape) == (3, 20, 30) and out["image"][0].float().mean() > 150


def test_mapper_bad_images(tmp_path, image_root):
    (image_root / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    bad = {"file_name": str(image_root / "bad.jpg"), "image_id": 5, "captions": ["x"]}
    mapper = CaptionDatasetMapper(_cfg(), is_train=True)
    assert mapper(bad) is None and mapper.num_bad_images == 1
    assert mapper(dict(bad, file_name=str(image_root / "missing.png"))) is None and mapper.num_bad_images == 2
    strict = CaptionDatasetMapper(_cfg(), is_train=True, skip_bad_images=False)
    with pytest.raises(BadImageError, match="bad.jpg"):
        strict(bad)
    # every image bad: a clear error after max_tries, never a hang
    with pytest.raises(BadSampleError, match="in a row.*bad.jpg"):
        SafeMappedDataset([bad] * 5, strict, max_bad_fraction=1.0)[0]


def test_train_loader_batches_and_skips_bad_images(tmp_path, image_root):
    (image_root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    records = CAPTIONS + [("broken.png", "A broken image.")]
    SIZES_BAD = dict(SIZES, **{"broken.png": (40, 60)})
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"file_name": f, "caption": c}) + "\n" for f, c in records))
    register_caption_dataset("test_caption_loader", str(caps), str(image_root))
    try:
        cfg = _cfg("test_caption_loader")
        cfg.DATALOADER.MAX_BAD_SAMPLE_FRACTION = 0.5  # 1 of 4 images is broken
        loader = build_caption_train_loader(cfg)
        it = iter(loader)
        files = []
        for _ in range(6):
            batch = next(it)
            assert len(batch) == 2
            for x in batch:
                assert x["image"].dtype == torch.uint8 and x["image"].shape[0] == 3
                assert min(x["image"].shape[1:]) == 32
                assert x["caption"] in x["captions"] and isinstance(x["caption"], str)
                assert (x["height"], x["width"]) == SIZES_BAD[x["file_name"].rsplit("/", 1)[1]]
                files.append(x["file_name"])
        assert not any(f.endswith("broken.png") for f in files)
        assert {f.rsplit("/", 1)[1] for f in files} == set(SIZES)
    finally:
        DatasetCatalog.remove("test_caption_loader")
        MetadataCatalog.remove("test_caption_loader")


def test_loader_errors():
    with pytest.raises(KeyError, match="not registered"):
        build_caption_train_loader(_cfg("no_such_caption_set"))
