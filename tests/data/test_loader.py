"""Training loaders: exact resume of the data stream (with and without orientation grouping,
any number of workers), repeat-factor sampling, and bad samples skipped up to a ceiling."""
import logging

import numpy as np
import pytest
import torch
from helpers import make_coco
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from regionclip_d2 import get_regionclip_cfg
from regionclip_d2.data.datasets import register_coco_format
from regionclip_d2.data.loader import (
    BadSampleError,
    Orientations,
    ResumableTrainLoader,
    SafeMappedDataset,
    _IndexStream,
    build_resumable_train_loader,
    header_orientation,
)
from regionclip_d2.engine.trainer import RegionCLIPTrainer


def _dicts(n=23, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (30, 50) if rng.random() < 0.6 else (50, 30)
        out.append({"file_name": f"{i}.png", "image_id": i, "height": h, "width": w})
    return out


def _mapper(d):
    # random draws stand in for augmentation: they must depend on the stream position only
    return dict(d, draw=float(np.random.rand()), tdraw=float(torch.rand(())))


def _take(loader, n):
    it = iter(loader)
    return [[(x["image_id"], x["draw"], x["tdraw"]) for x in next(it)] for _ in range(n)]


@pytest.mark.parametrize("grouped", [False, True])
def test_resumed_stream_equals_uninterrupted(grouped):
    dicts = _dicts()

    def loader(workers, start=0):
        ld = ResumableTrainLoader(SafeMappedDataset(dicts, _mapper), total_batch_size=3, seed=7,
                                  aspect_ratio_grouping=grouped, num_workers=workers)
        ld.start_iter = start
        return ld

    full = _take(loader(0), 20)
    assert len({i for batch in full for i, _, _ in batch}) == len(dicts)  # crosses epochs, sees every sample
    if grouped:
        for batch in full:
            assert len({dicts[i]["width"] > dicts[i]["height"] for i, _, _ in batch}) == 1
    for start in (1, 7, 13):
        assert _take(loader(0, start), 20 - start) == full[start:], start
    # worker processes change nothing
    assert _take(loader(2), 20) == full
    assert _take(loader(2, 7), 13) == full[7:]
    # another seed, another stream
    other = ResumableTrainLoader(SafeMappedDataset(dicts, _mapper), total_batch_size=3, seed=8,
                                 aspect_ratio_grouping=grouped)
    assert _take(other, 20) != full


def test_grouped_resume_without_sizes_replays_from_the_image_headers(tmp_path):
    """Caption data sets have no sizes in their dicts: the grouping is replayed from the
    image headers, and a bad sample replaced by one of the other orientation stays in the
    buffer of its own orientation, so every resume point gives the uninterrupted batches."""
    rng = np.random.default_rng(1)
    dicts = []
    for i in range(13):
        h, w = (30, 50) if rng.random() < 0.6 else (50, 30)
        Image.new("RGB", (w, h)).save(tmp_path / f"{i}.png")
        dicts.append({"file_name": str(tmp_path / f"{i}.png"), "image_id": i})
    landscape = [header_orientation(d["file_name"]) == 0 for d in dicts]
    # bad images, each followed by an image of the other orientation (its replacement)
    bad = [i for i in range(12) if landscape[i] != landscape[i + 1]][:3]
    assert len(bad) == 3
    for i in bad:
        png = (tmp_path / f"{i}.png").read_bytes()
        (tmp_path / f"{i}.png").write_bytes(png[:60])  # the header (size) is intact, the data is not

    def mapper(d):
        with Image.open(d["file_name"]) as im:
            im.load()  # raises for the truncated files
            w, h = im.size
        return dict(d, width=w, height=h, draw=float(np.random.rand()), tdraw=float(torch.rand(())))

    def loader(workers, start=0):
        ld = ResumableTrainLoader(SafeMappedDataset(dicts, mapper, max_bad_fraction=0.5), total_batch_size=3,
                                  seed=5, aspect_ratio_grouping=True, num_workers=workers)
        ld.start_iter = start
        return ld

    full = _take(loader(0), 16)
    assert {i for batch in full for i, _, _ in batch} == set(range(13)) - set(bad)
    # a replacement of the other orientation does share a batch with the bad image's orientation
    mixed = [b for b in full if len({landscape[i] for i, _, _ in b}) > 1]
    assert mixed and all({i - 1 for i, _, _ in b} & set(bad) for b in mixed)
    for start in range(1, 16):
        assert _take(loader(0, start), 16 - start) == full[start:], start
    assert _take(loader(2, 9), 7) == full[9:]


def test_orientations_read_headers_once_and_apply_exif(tmp_path):
    Image.new("RGB", (40, 20)).save(tmp_path / "wide.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: decoded (as detectron2 does) it is 20 wide, 40 high
    Image.new("RGB", (40, 20)).save(tmp_path / "rotated.jpg", exif=exif)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    dicts = [{"file_name": str(tmp_path / n)} for n in ("wide.png", "rotated.jpg", "junk.png", "missing.png")]
    dicts.append({"file_name": str(tmp_path / "missing.png"), "width": 10, "height": 30})  # sizes win
    o = Orientations(dicts)
    assert [o[i] for i in range(5)] == [0, 1, 0, 0, 1]
    assert [o[i] for i in range(5)] == [0, 1, 0, 0, 1] and o.num_read == 4


def test_repeat_factor_stream():
    rf = torch.tensor([1.0, 3.0, 1.5, 1.0])
    stream = _IndexStream(4, seed=3, repeat_factors=rf)
    counts = np.bincount([stream[p] for p in range(6500)], minlength=4)
    freq = counts / counts.sum()
    assert np.allclose(freq, (rf / rf.sum()).numpy(), atol=0.02), freq
    again = _IndexStream(4, seed=3, repeat_factors=rf)
    assert [again[p] for p in range(3000, 3100)] == [stream[p] for p in range(3000, 3100)]


def _corrupt(images):
    (images / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # header, no data
    png = (images / "1.png").read_bytes()
    (images / "1.png").write_bytes(png[: len(png) // 2])  # truncated half way


def _cfg(name, fraction, grouping=False, floor=0):
    cfg = get_regionclip_cfg()
    cfg.merge_from_list(["DATASETS.TRAIN", (name,), "DATALOADER.NUM_WORKERS", 0, "SOLVER.IMS_PER_BATCH", 2,
                         "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 96, "SEED", 0,
                         "DATALOADER.MAX_BAD_SAMPLE_FRACTION", fraction,
                         "DATALOADER.MIN_BAD_SAMPLES_TOLERATED", floor,
                         "DATALOADER.ASPECT_RATIO_GROUPING", grouping])
    return cfg


def test_bad_images_skipped_logged_and_capped(tmp_path, caplog):
    ann, images = make_coco(tmp_path, n_images=10)
    _corrupt(images)
    register_coco_format("test_loader_bad", ann, images)
    try:
        with caplog.at_level(logging.WARNING, logger="regionclip_d2.data.loader"):
            loader = RegionCLIPTrainer.build_train_loader(_cfg("test_loader_bad", 0.3))
            (images / "2.png").unlink()  # vanishes after the data set was loaded
            it = iter(loader)
            seen = [x["file_name"].rsplit("/", 1)[1] for _ in range(15) for x in next(it)]
        assert not {"0.png", "1.png", "2.png"} & set(seen)
        assert {f"{i}.png" for i in range(3, 10)} <= set(seen)
        assert sorted(loader.dataset.bad) == [0, 1, 2]
        for name in ("0.png", "1.png", "2.png"):
            assert any(name in r.getMessage() and "skipping bad training sample" in r.getMessage()
                       for r in caplog.records), name
        # a ceiling below the bad fraction (3 of 10) stops the run, saying what to change
        (images / "2.png").write_bytes(b"")  # empty file
        loader = RegionCLIPTrainer.build_train_loader(_cfg("test_loader_bad", 0.2))
        with pytest.raises(BadSampleError, match=r"3 of 10 training samples.*MAX_BAD_SAMPLE_FRACTION=0.2"):
            it = iter(loader)
            for _ in range(15):
                next(it)
    finally:
        DatasetCatalog.remove("test_loader_bad")
        MetadataCatalog.remove("test_loader_bad")


def _failing_mapper(bad):
    def mapper(d):
        if d["image_id"] in bad:
            raise OSError(f"image file is truncated ({d['file_name']})")
        return d
    return mapper


def _drain(dataset, n=60):
    return [dataset[i % len(dataset)]["image_id"] for i in range(n)]


def test_tiny_data_set_tolerates_a_few_bad_samples(tmp_path):
    """The default ceiling, 1% of 20 samples, would stop at the first bad one; the floor
    (DATALOADER.MIN_BAD_SAMPLES_TOLERATED, default 5) lets a few through."""
    dicts = [{"file_name": f"{i}.png", "image_id": i, "height": 8, "width": 8} for i in range(20)]
    cfg = get_regionclip_cfg()
    assert (cfg.DATALOADER.MAX_BAD_SAMPLE_FRACTION, cfg.DATALOADER.MIN_BAD_SAMPLES_TOLERATED) == (0.01, 5)
    cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0, "SEED", 0])
    loader = build_resumable_train_loader(cfg, dicts, _failing_mapper({3}))
    assert loader.dataset.max_bad == 5
    it = iter(loader)
    seen = {x["image_id"] for _ in range(30) for x in next(it)}  # three epochs
    assert seen == set(range(20)) - {3} and sorted(loader.dataset.bad) == [3]
    # five bad samples are still tolerated, the sixth stops the run naming both keys
    ds = SafeMappedDataset(dicts, _failing_mapper({1, 4, 7, 10, 13}), min_bad_tolerated=5)
    assert set(_drain(ds)) == set(range(20)) - {1, 4, 7, 10, 13}
    ds = SafeMappedDataset(dicts, _failing_mapper({1, 4, 7, 10, 13, 16}), min_bad_tolerated=5)
    with pytest.raises(BadSampleError, match=r"6 of 20 training samples.*MAX_BAD_SAMPLE_FRACTION=0.01.*"
                                             r"MIN_BAD_SAMPLES_TOLERATED=5; latest: 16.png"):
        _drain(ds)
    # a large data set: the fraction rules (1% of 1000 = 10)
    many = [{"file_name": f"{i}.png", "image_id": i} for i in range(1000)]
    assert SafeMappedDataset(many, _failing_mapper(set()), min_bad_tolerated=5).max_bad == 10
    # both 0: the first bad sample stops the run
    ds = SafeMappedDataset(dicts, _failing_mapper({2}), max_bad_fraction=0.0, min_bad_tolerated=0)
    with pytest.raises(BadSampleError, match="1 of 20"):
        _drain(ds)
    with pytest.raises(ValueError, match="MIN_BAD_SAMPLES_TOLERATED"):
        SafeMappedDataset(dicts, ds.mapper, min_bad_tolerated=-1)
    # a tiny data set whose every sample fails still stops, however high the floor
    ds = SafeMappedDataset(dicts[:3], _failing_mapper({0, 1, 2}), min_bad_tolerated=5)
    with pytest.raises(BadSampleError, match="3 training samples in a row"):
        ds[0]


def test_malformed_annotations_skipped(tmp_path):
    ann, images = make_coco(tmp_path, n_images=4)
    register_coco_format("test_loader_ann", ann, images)
    try:
        dicts = [dict(d) for d in DatasetCatalog.get("test_loader_ann")]
    finally:
        DatasetCatalog.remove("test_loader_ann")
        MetadataCatalog.remove("test_loader_ann")
    dicts[1]["annotations"] = [dict(dicts[1]["annotations"][0], bbox=[1.0, 2.0])]  # a box of two numbers
    dicts[2]["annotations"] = [dict(dicts[2]["annotations"][0], bbox_mode="not a mode")]
    from regionclip_d2.data.mappers import build_train_mapper

    cfg = _cfg("unused", 0.5)
    loader = build_resumable_train_loader(cfg, dicts, build_train_mapper(cfg))
    it = iter(loader)
    seen = {x["image_id"] for _ in range(6) for x in next(it)}
    assert seen == {dicts[0]["image_id"], dicts[3]["image_id"]}
    assert sorted(loader.dataset.bad) == [1, 2]


def test_all_bad_is_a_clear_error(tmp_path):
    dicts = [{"file_name": str(tmp_path / f"none{i}.png"), "image_id": i, "height": 8, "width": 8}
             for i in range(5)]
    from detectron2.data import DatasetMapper
    from detectron2.data import transforms as T

    ds = SafeMappedDataset(dicts, DatasetMapper(is_train=True, augmentations=[T.ResizeShortestEdge(8, 8)],
                                                image_format="RGB"), max_bad_fraction=1.0)
    with pytest.raises(BadSampleError, match=r"5 training samples in a row.*none0.png"):
        ds[0]
    Image.new("RGB", (8, 8)).save(tmp_path / "none3.png")
    ds = SafeMappedDataset(dicts, ds.mapper, max_bad_fraction=1.0)
    assert ds[0]["image_id"] == 3 and sorted(ds.bad) == [0, 1, 2]
    with pytest.raises(ValueError, match="MAX_BAD_SAMPLE_FRACTION"):
        SafeMappedDataset(dicts, ds.mapper, max_bad_fraction=2.0)
    with pytest.raises(ValueError, match="empty"):
        SafeMappedDataset([], ds.mapper)


def test_images_missing_on_disk_are_dropped_with_their_annotations_and_counted(tmp_path, caplog):
    import json
    import os

    from regionclip_d2.data.datasets import check_coco_annotations

    ann, images = make_coco(tmp_path, n_images=3, seed=0)
    data = json.loads(open(ann).read())
    gone = data["images"][1]
    os.remove(os.path.join(images, gone["file_name"]))
    n_gone = sum(a["image_id"] == gone["id"] for a in data["annotations"])
    stats = check_coco_annotations(data, ann, image_root=images)
    assert stats["images missing on disk (dropped)"] == 1
    assert stats["annotations of dropped images"] == n_gone > 0
    assert gone["id"] not in {im["id"] for im in data["images"]}
    assert all(a["image_id"] != gone["id"] for a in data["annotations"])
    # the same through registration: the log names the count
    with caplog.at_level(logging.WARNING):
        register_coco_format("missing_images_test", ann, images)
        dicts = DatasetCatalog.get("missing_images_test")
    assert len(dicts) == 2
    assert "images missing on disk (dropped)" in caplog.text


def test_structural_annotation_errors_name_the_entry(tmp_path):
    import json

    from regionclip_d2.data.datasets import AnnotationError, check_coco_annotations

    base = {"images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}],
            "categories": [{"id": 1, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}]}
    for change, pattern in (
            (lambda d: d["annotations"][0].update(bbox=[1, 2]), r"annotations\[0\].*bbox"),
            (lambda d: d["annotations"][0].update(category_id=7), r"annotations\[0\].*category.*7"),
            (lambda d: d["images"].append(dict(d["images"][0])), r"image.*1"),
            (lambda d: d["images"][0].pop("file_name"), r"images\[0\].*file_name")):
        data = json.loads(json.dumps(base))
        change(data)
        with pytest.raises(AnnotationError, match=pattern):
            check_coco_annotations(data, "ann.json")
