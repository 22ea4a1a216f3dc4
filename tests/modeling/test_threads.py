"""One DefaultPredictor (CLIPFastRCNN) shared by several threads.

Claims tested here:

* concurrent predict calls give the detections of sequential calls, the first calls
  included (they race the lazy embedding of a vocabulary given as names: one thread
  embeds it, once, the others wait; the on-disk embedding cache is written safely);
* ``set_vocabulary`` while other threads predict: each prediction uses either the old or
  the new vocabulary entirely (never a mix), but which one is not defined; the model's
  embeddings and ``class_names`` always belong together.
"""
import concurrent.futures
import threading
import time
from unittest import mock

import numpy as np
import pytest
import torch
from helpers import tiny_cfg

from detectron2.engine import DefaultPredictor

import regionclip_d2.modeling.meta_arch.clip_rcnn as clip_rcnn
import regionclip_d2.modeling.text.embedding as embedding
from regionclip_d2.modeling.text import build_language_encoder, embed_class_names

C4_RPN = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml"
THREADS = 4


def _predictor(tiny_clip_config):
    cfg = tiny_cfg(C4_RPN, tiny_clip_config, extra=["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
                                                     "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 160])
    torch.manual_seed(0)  # the same random weights for every predictor built here
    return DefaultPredictor(cfg)


def _images(n):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (int(rng.integers(60, 100)), int(rng.integers(60, 140)), 3), dtype=np.uint8)
            for _ in range(n)]


def _detections(out):
    inst = out["instances"]
    return inst.pred_boxes.tensor.clone(), inst.scores.clone(), inst.pred_classes.clone()


def _assert_same(a, b):
    (ba, sa, ca), (bb, sb, cb) = a, b
    assert ca.tolist() == cb.tolist() and len(ca) > 0
    torch.testing.assert_close(ba, bb, rtol=0, atol=1e-5)
    torch.testing.assert_close(sa, sb, rtol=0, atol=1e-5)


def _same(a, b) -> bool:
    try:
        _assert_same(a, b)
    except AssertionError:
        return False
    return True


def _run_concurrently(fn, jobs):
    """``fn(job)`` for every job on THREADS threads that start together; results in job order."""
    barrier = threading.Barrier(THREADS)

    def worker(k):
        barrier.wait()
        return [(j, fn(jobs[j])) for j in range(k, len(jobs), THREADS)]

    with concurrent.futures.ThreadPoolExecutor(THREADS) as ex:
        done = [f.result() for f in [ex.submit(worker, k) for k in range(THREADS)]]
    return [r for _, r in sorted((x for d in done for x in d), key=lambda x: x[0])]


class _Slow:
    """Wraps a function: counts the calls and sleeps in them, to widen a race window."""

    def __init__(self, fn, seconds, after=False):
        self.fn, self.seconds, self.after, self.calls = fn, seconds, after, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if not self.after:
            time.sleep(self.seconds)
        out = self.fn(*args, **kwargs)
        if self.after:
            time.sleep(self.seconds)
        return out


def test_concurrent_predictions_match_sequential(tiny_clip_config, tmp_path, monkeypatch):
    images = _images(3 * THREADS)
    reference = _predictor(tiny_clip_config)
    expected = [_detections(reference(im)) for im in images]

    monkeypatch.setenv("REGIONCLIP_CACHE", str(tmp_path / "fresh_cache"))  # the first calls embed and write
    predictor = _predictor(tiny_clip_config)
    assert predictor.model.roi_heads.box_predictor.train_vocabulary.stale  # names: embedded on the first call
    slow_embed = _Slow(embed_class_names, 0.2)
    slow_save = _Slow(torch.save, 0.05, after=True)
    with mock.patch.object(clip_rcnn, "embed_class_names", slow_embed), mock.patch.object(embedding.torch, "save",
                                                                                           slow_save):
        got = _run_concurrently(lambda im: _detections(predictor(im)), images)
    assert slow_embed.calls == 1 and slow_save.calls == 1  # one thread embedded the vocabulary, once
    for a, b in zip(got, expected):
        _assert_same(a, b)
    got = _run_concurrently(lambda im: _detections(predictor(im)), images)  # warm model: still the same
    for a, b in zip(got, expected):
        _assert_same(a, b)


def test_concurrent_cache_writes(tiny_clip_config, tmp_path):
    """Threads embedding the same names at once all succeed and leave one readable cache file."""
    encoder = build_language_encoder("", tiny_clip_config)
    names = ["red star", "blue ring"]
    expected = embed_class_names(names, encoder, templates="single", use_cache=False)
    slow_save = _Slow(torch.save, 0.1, after=True)  # os.replace of one thread lands while another writes
    with mock.patch.object(embedding.torch, "save", slow_save):
        got = _run_concurrently(lambda _: embed_class_names(names, encoder, templates="single",
                                                            cache_dir=str(tmp_path)), list(range(THREADS)))
    assert slow_save.calls == THREADS
    for g in got:
        torch.testing.assert_close(g, expected)
    files = list((tmp_path / "text_embeddings").iterdir())
    assert len(files) == 1 and files[0].suffix == ".pth"  # no temporary file left behind
    torch.testing.assert_close(torch.load(files[0], weights_only=True), expected)


def test_set_vocabulary_while_predicting(tiny_clip_config):
    """Each prediction made while another thread swaps the vocabulary is exactly the
    prediction of the old or of the new vocabulary (which one is not defined)."""
    predictor = _predictor(tiny_clip_config)
    model = predictor.model
    g = torch.Generator().manual_seed(1)
    vocabularies = [(torch.randn(3, 64, generator=g), ["a", "b", "c"]),
                    (torch.randn(5, 64, generator=g), ["p", "q", "r", "s", "t"])]
    images = _images(2)
    reference = []
    for emb, names in vocabularies:
        model.set_vocabulary(emb, names)
        reference.append([_detections(predictor(im)) for im in images])
    assert reference[0][0][2].max() < 3 and reference[1][0][2].max() >= 3  # the two are told apart

    stop = threading.Event()

    def swap():
        k = 0
        while not stop.is_set():
            model.set_vocabulary(*vocabularies[k % 2])
            k += 1
            names = model.class_names
            emb = model.roi_heads.box_predictor.test_vocabulary.embeddings
            assert len(names) == emb.shape[0]  # names and embeddings belong together
        return k

    with concurrent.futures.ThreadPoolExecutor(THREADS) as ex:
        swapper = ex.submit(swap)
        try:
            results = [ex.submit(lambda i=i: [(i % 2, _detections(predictor(images[i % 2]))) for _ in range(4)])
                       for i in range(THREADS - 1)]
            results = [x for f in results for x in f.result()]
        finally:
            stop.set()
        assert swapper.result() > 1
    used = set()
    for i, det in results:
        matches = [v for v in (0, 1) if _same(det, reference[v][i])]
        assert len(matches) == 1, "a prediction matches neither vocabulary"
        used.add(matches[0])
    assert used  # (usually both vocabularies are seen; which one a call uses is not defined)


class _SlowNames(list):
    """Class names whose copying takes a while: set_vocabulary copies the names after it
    has stored the embeddings, so this widens the window between the two (a different
    delay per vocabulary, so that a later call can overtake an earlier one)."""

    def __init__(self, names, delay):
        super().__init__(names)
        self.delay = delay

    def __iter__(self):
        time.sleep(self.delay)
        return super().__iter__()


def test_concurrent_set_vocabulary_keeps_names_with_embeddings(tiny_clip_config):
    """Two threads set different vocabularies; the second starts while the first is between
    storing its embeddings and its names. Afterwards names and embeddings still match."""
    predictor = _predictor(tiny_clip_config)
    model = predictor.model
    g = torch.Generator().manual_seed(2)
    first = (torch.randn(3, 64, generator=g), _SlowNames(["a", "b", "c"], 0.3))
    second = (torch.randn(5, 64, generator=g), _SlowNames(["p", "q", "r", "s", "t"], 0.0))
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        a = ex.submit(model.set_vocabulary, *first)
        time.sleep(0.1)  # the first thread now sleeps in copying its names
        b = ex.submit(model.set_vocabulary, *second)
        a.result(), b.result()
    names = model.class_names
    emb = model.roi_heads.box_predictor.test_vocabulary.embeddings
    assert names in (list(first[1]), list(second[1]))
    torch.testing.assert_close(emb, first[0] if names == list(first[1]) else second[0])


@pytest.mark.parametrize("when,expected", [("before_scoring", 1), ("after_scoring", 0)])
def test_set_vocabulary_forced_inside_a_prediction(tiny_clip_config, when, expected):
    """Another thread's set_vocabulary lands at a chosen point of a running prediction: after
    the region features and before scoring, the whole prediction is the new vocabulary's;
    after scoring, the whole prediction is the old one's (never a mix)."""
    predictor = _predictor(tiny_clip_config)
    model, pred = predictor.model, predictor.model.roi_heads.box_predictor
    g = torch.Generator().manual_seed(3)
    vocabularies = [(torch.randn(3, 64, generator=g), ["a", "b", "c"]),
                    (torch.randn(5, 64, generator=g), ["p", "q", "r", "s", "t"])]
    image = _images(1)[0]
    reference = []
    for emb, names in vocabularies:
        model.set_vocabulary(emb, names)
        reference.append(_detections(predictor(image)))
    model.set_vocabulary(*vocabularies[0])

    def swap_in_another_thread():
        t = threading.Thread(target=model.set_vocabulary, args=vocabularies[1])
        t.start()
        t.join()

    name = "embed" if when == "before_scoring" else "inference"
    original = getattr(pred, name)

    def hooked(*args, **kwargs):
        swap_in_another_thread()
        return original(*args, **kwargs)

    setattr(pred, name, hooked)
    try:
        got = _detections(predictor(image))
    finally:
        delattr(pred, name)
    assert model.class_names == vocabularies[1][1]  # the swap happened during the call
    _assert_same(got, reference[expected])
