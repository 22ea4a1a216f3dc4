"""Training loaders that skip bad samples and resume exactly where a run stopped.

A training stream is a function of ``(seed, position)``:

* the order of samples is an infinite sequence of seeded permutations of the data set (one
  per epoch; with repeat factors, the LVIS sampling of detectron2's
  ``RepeatFactorTrainingSampler``), identical on every process;
* global batch ``k`` of a run with ``W`` processes and ``B`` images per process holds the
  stream positions ``k*W*B .. (k+1)*W*B - 1``, process ``r`` taking its ``B`` of them;
* every sample is mapped (decoded, augmented) with the Python, NumPy and torch random
  generators seeded from ``(seed, position)``.

So a run resumed at iteration ``i`` (``loader.start_iter = i``) sees exactly the batches an
uninterrupted run would have seen from ``i`` on, whatever the number of loader workers.
With ``DATALOADER.ASPECT_RATIO_GROUPING`` (batches of one orientation, formed from the
stream through two buffers) a sample goes to the buffer of its data set dict's orientation
(:class:`Orientations`: the dict's ``width``/``height``, else the image file's header, read
once per image and cached, 1 byte per image), not of what the mapper returned; so the
buffers' content at iteration ``i`` is replayed exactly, without decoding, from the
orientations of the samples before ``i`` (caption files, which carry no sizes, included).
A bad sample replaced by the next one (see below) stays in the buffer of the bad one's
orientation. Exact as long as the image files are unchanged between the run and its resume
(a file whose header cannot be read counts as landscape).

Bad samples (an image that is missing, truncated or undecodable, an annotation the mapper
rejects) are skipped: :class:`SafeMappedDataset` logs each with its file name, counts it,
uses the next sample of the data set instead, and raises :class:`BadSampleError` once more
than ``max(max_bad_fraction * len(data set), min_bad_tolerated)`` samples have proven bad in
one loader process (``DATALOADER.MAX_BAD_SAMPLE_FRACTION``, ``DATALOADER.MIN_BAD_SAMPLES_TOLERATED``:
the floor keeps a data set of fewer than a few hundred images from stopping at its first bad
image, which a fraction alone would do).
"""
import bisect
import itertools
import logging
import random
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

import detectron2.utils.comm as comm
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.utils.file_io import PathManager

logger = logging.getLogger(__name__)


class BadSampleError(RuntimeError):
    """Too many samples of a training data set could not be loaded."""


def seed_all(*key: int) -> None:
    """Seed Python's, NumPy's and torch's global generators from a tuple of integers."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(3)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    torch.manual_seed(int(state[2]))


class SafeMappedDataset(torch.utils.data.Dataset):
    """``mapper(dicts[i])`` where it works; where it raises (or returns ``None``) the sample
    is logged with its file name and counted, and ``dicts[i + 1]``, ``dicts[i + 2]``, ...
    are tried instead.

    Raises :class:`BadSampleError` when more than ``max_bad_fraction`` of the data set, and
    more than ``min_bad_tolerated`` samples, have failed in this process (the ceiling is
    ``max(max_bad_fraction * len(dicts), min_bad_tolerated)``; both 0 stop at the first bad
    sample), or ``max_tries`` samples in a row fail (a broken image folder stops the run at
    once, with the first error in the message; so does a data set whose every sample fails,
    however small).
    """

    def __init__(self, dicts: Sequence[dict], mapper: Callable, max_bad_fraction: float = 0.01,
                 max_tries: int = 100, min_bad_tolerated: int = 5):
        if not len(dicts):
            raise ValueError("the training data set is empty: check DATASETS.TRAIN and its annotation file")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"DATALOADER.MAX_BAD_SAMPLE_FRACTION must be in [0, 1], got {max_bad_fraction}")
        if min_bad_tolerated < 0:
            raise ValueError(f"DATALOADER.MIN_BAD_SAMPLES_TOLERATED must be >= 0, got {min_bad_tolerated}")
        self.dicts, self.mapper = dicts, mapper
        self.max_bad_fraction = max_bad_fraction
        self.min_bad_tolerated = int(min_bad_tolerated)
        self.max_bad = max(max_bad_fraction * len(dicts), self.min_bad_tolerated)
        self.max_tries = max(1, min(max_tries, len(dicts)))
        self.bad: Dict[int, str] = {}  # index -> reason, in this process

    def __len__(self):
        return len(self.dicts)

    def _name(self, d) -> str:
        return str(d.get("file_name", f"image_id {d.get('image_id')}")) if isinstance(d, dict) else repr(d)[:100]

    def _record(self, idx: int, d, reason: str) -> None:
        first = idx not in self.bad
        self.bad[idx] = reason
        n, total = len(self.bad), len(self.dicts)
        if first and (n <= 10 or n % 100 == 0):
            logger.warning("skipping bad training sample %s (%s): %d of %d skipped so far in this process",
                           self._name(d), reason, n, total)
        if n > self.max_bad:
            raise BadSampleError(
                f"{n} of {total} training samples ({100.0 * n / total:.2f}%) could not be loaded, more than "
                f"DATALOADER.MAX_BAD_SAMPLE_FRACTION={self.max_bad_fraction} of them and more than "
                f"DATALOADER.MIN_BAD_SAMPLES_TOLERATED={self.min_bad_tolerated}; latest: {self._name(d)} ({reason}). "
                "Fix or remove the bad files, or raise DATALOADER.MAX_BAD_SAMPLE_FRACTION")

    def __getitem__(self, idx: int):
        n = len(self.dicts)
        first_error = None
        for k in range(self.max_tries):
            j = (idx + k) % n
            d = self.dicts[j]
            try:
                out = self.mapper(d)
                reason = "the mapper returned None"
            except Exception as e:  # noqa: BLE001  any failure of one sample: decode, resize, annotations
                out, reason = None, f"{type(e).__name__}: {e}"
            if out is not None:
                return out
            first_error = first_error or f"{self._name(d)}: {reason}"
            self._record(j, d, reason)
        raise BadSampleError(f"{self.max_tries} training samples in a row (from index {idx}) could not be loaded; "
                             f"first: {first_error}. Check the image folder and the annotation file")


class _IndexStream:
    """Random access to the infinite sample-index stream (increasing positions are cheap)."""

    def __init__(self, num_samples: int, seed: int, repeat_factors: Optional[torch.Tensor] = None):
        self.n, self.seed, self.repeat_factors = num_samples, seed, repeat_factors
        self._epoch_starts = [0]
        self._epoch, self._perm = -1, None

    def _epoch_indices(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) & 0x7FFFFFFFFFFFFFFF)
        if self.repeat_factors is None:
            return torch.randperm(self.n, generator=g)
        # stochastic rounding of the repeat factors, as RepeatFactorTrainingSampler does
        rf = self.repeat_factors
        whole = torch.trunc(rf)
        reps = whole + (torch.rand(len(rf), generator=g) < rf - whole).float()
        idx = torch.repeat_interleave(torch.arange(len(rf)), reps.long())
        return idx[torch.randperm(len(idx), generator=g)]

    def _epoch_length(self, epoch: int) -> int:
        return self.n if self.repeat_factors is None else len(self._epoch_indices(epoch))

    def __getitem__(self, pos: int) -> int:
        if self.repeat_factors is None:
            epoch, offset = divmod(pos, self.n)
        else:
            while self._epoch_starts[-1] <= pos:
                e = len(self._epoch_starts) - 1
                self._epoch_starts.append(self._epoch_starts[-1] + max(1, self._epoch_length(e)))
            epoch = bisect.bisect_right(self._epoch_starts, pos) - 1
            offset = pos - self._epoch_starts[epoch]
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, self._epoch_indices(epoch)
        return int(self._perm[offset % len(self._perm)]) if len(self._perm) else 0


def _bucket(d) -> int:
    return 0 if d["width"] > d["height"] else 1  # detectron2's two orientation groups


_EXIF_ORIENTATION = 0x0112  # values 5..8: the decoded image is transposed (detectron2's read_image)


def header_orientation(file_name: str) -> int:
    """The orientation group of an image file from its header (no decoding): 0 if it is
    wider than high once its EXIF orientation is applied, else 1; 0 when the header
    cannot be read (a missing or broken file: the mapper will skip it anyway)."""
    try:
        with PathManager.open(file_name, "rb") as f:
            from PIL import Image

            with Image.open(f) as im:
                w, h = im.size
                # getexif() of some formats (PNG) decodes the image: only where the header had EXIF
                if "exif" in im.info and im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
                    w, h = h, w
    except Exception:  # noqa: BLE001  unreadable header: a fixed group, the same in a run and its resume
        return 0
    return 0 if w > h else 1


class Orientations:
    """The orientation group (0 landscape, 1 portrait or square) of each data set dict, by
    index: from its ``width``/``height`` where it has them, else from its image file's
    header (:func:`header_orientation`), read at most once per image in a process and
    cached in one byte per image (no image is decoded or kept)."""

    def __init__(self, dicts: Sequence[dict]):
        self.dicts = dicts
        self._cache = np.full(len(dicts), -1, dtype=np.int8)
        self.num_read = 0  # headers read in this process

    def __len__(self):
        return len(self.dicts)

    def __getitem__(self, idx: int) -> int:
        key = int(self._cache[idx])
        if key < 0:
            d = self.dicts[idx]
            if "width" in d and "height" in d:
                key = _bucket(d)
            elif d.get("file_name"):
                key = header_orientation(d["file_name"])
                self.num_read += 1
            else:
                key = 0  # nothing to read the size from: a fixed group
            self._cache[idx] = key
        return key


class PositionStream(torch.utils.data.IterableDataset):
    """The samples of this process from ``start_batch`` on (see the module docstring).

    Ungrouped: worker ``w`` of ``N`` yields the whole batches ``start_batch + w``,
    ``start_batch + w + N``, ... Grouped (batches formed later by orientation): the
    process's items are the positions ``prefix`` (samples still waiting in the orientation
    buckets when the run stopped) followed by its share of the stream from item ``cursor``
    on; worker ``w`` yields items ``w``, ``w + N``, ...; DataLoader returns them in order,
    each as ``(orientation, sample)``: the orientation of the sample's data set dict from
    ``orientations`` (``None`` without it: that of the mapped sample is used)."""

    def __init__(self, dataset: torch.utils.data.Dataset, *, seed: int, batch_size: int, start_batch: int = 0,
                 grouped: bool = False, repeat_factors: Optional[torch.Tensor] = None,
                 prefix: Sequence[int] = (), cursor: Optional[int] = None,
                 orientations: Optional[Orientations] = None):
        self.dataset, self.seed, self.batch_size = dataset, seed, batch_size
        self.orientations = orientations
        self.start_batch, self.grouped, self.repeat_factors = start_batch, grouped, repeat_factors
        self.prefix = list(prefix)
        self.cursor = start_batch * batch_size if cursor is None else cursor
        self.rank, self.world = comm.get_rank(), comm.get_world_size()

    def positions(self, worker: int = 0, num_workers: int = 1) -> Iterator[int]:
        B, W, r = self.batch_size, self.world, self.rank
        if self.grouped:  # process r takes every W-th sample of the stream
            for t in itertools.count(worker, num_workers):
                yield self.prefix[t] if t < len(self.prefix) else (self.cursor + t - len(self.prefix)) * W + r
        else:
            for k in itertools.count(self.start_batch + worker, num_workers):
                base = (k * W + r) * B
                yield from range(base, base + B)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = _IndexStream(len(self.dataset), self.seed, self.repeat_factors)
        for pos in self.positions(worker, num_workers):
            idx = stream[pos]
            seed_all(self.seed, pos)
            if not self.grouped:
                yield self.dataset[idx]
            else:
                yield (self.orientations[idx] if self.orientations is not None else None), self.dataset[idx]


def replay_grouping(orientations: Sequence[int], stream: "_IndexStream", batch_size: int, num_batches: int,
                    rank: int = 0, world: int = 1):
    """Replay the orientation grouping of a process's first ``num_batches`` batches from
    the orientation of each data set index (``orientations[i]``, see :class:`Orientations`;
    no decoding). Returns ``(prefix, cursor)`` for :class:`PositionStream`."""
    buckets, t = ([], []), 0
    for _ in range(num_batches):
        while True:
            pos = t * world + rank
            t += 1
            bucket = buckets[orientations[stream[pos]]]
            bucket.append(pos)
            if len(bucket) == batch_size:
                bucket.clear()
                break
    return sorted(buckets[0] + buckets[1]), t


def _group(items, batch_size: int):
    buckets = ([], [])
    for key, d in items:
        bucket = buckets[_bucket(d) if key is None else key]
        bucket.append(d)
        if len(bucket) == batch_size:
            yield bucket[:]
            bucket.clear()


def _trivial_collate(batch):
    return batch


class ResumableTrainLoader:
    """An infinite iterable of per-process batches (lists of mapped dicts) built from
    ``dataset`` when iteration starts, so ``start_iter`` and ``seed`` may be set after
    construction (the trainer does so when it resumes). Iterating again restarts at
    ``start_iter``."""

    def __init__(self, dataset: torch.utils.data.Dataset, *, total_batch_size: int, seed: Optional[int] = None,
                 aspect_ratio_grouping: bool = False, num_workers: int = 0,
                 repeat_factors: Optional[torch.Tensor] = None):
        world = comm.get_world_size()
        if total_batch_size <= 0 or total_batch_size % world:
            raise ValueError(f"SOLVER.IMS_PER_BATCH={total_batch_size} must be a positive multiple of the number "
                             f"of processes ({world})")
        self.dataset, self.batch_size = dataset, total_batch_size // world
        self.seed, self.start_iter = seed, 0
        self.aspect_ratio_grouping, self.num_workers = aspect_ratio_grouping, num_workers
        self.repeat_factors = repeat_factors

    def _build(self):
        seed = self.seed if self.seed is not None else comm.shared_random_seed()
        self.seed = seed
        kw = dict(seed=seed, batch_size=self.batch_size, start_batch=self.start_iter,
                  grouped=self.aspect_ratio_grouping, repeat_factors=self.repeat_factors)
        if not self.aspect_ratio_grouping:
            return torch.utils.data.DataLoader(PositionStream(self.dataset, **kw), batch_size=self.batch_size,
                                               drop_last=True, num_workers=self.num_workers,
                                               collate_fn=_trivial_collate)
        dicts = getattr(self.dataset, "dicts", None)
        orientations = Orientations(dicts) if dicts is not None else None
        if self.start_iter and orientations is None:
            logger.warning("resuming with DATALOADER.ASPECT_RATIO_GROUPING but the data set has no dicts to "
                           "replay the grouping from: the data stream restarts at sample %d, not exactly where "
                           "it stopped", self.start_iter * self.batch_size)
        elif self.start_iter:
            start = time.perf_counter()
            stream = _IndexStream(len(self.dataset), seed, self.repeat_factors)
            prefix, cursor = replay_grouping(orientations, stream, self.batch_size, self.start_iter,
                                             comm.get_rank(), comm.get_world_size())
            kw.update(prefix=prefix, cursor=cursor)
            logger.info("replayed the orientation grouping of %d batches (%d samples; %d image headers read) in "
                        "%.1f s", self.start_iter, cursor, orientations.num_read, time.perf_counter() - start)
        kw.update(orientations=orientations)
        loader = torch.utils.data.DataLoader(PositionStream(self.dataset, **kw), batch_size=None,
                                             num_workers=self.num_workers)
        return _group(loader, self.batch_size)

    def __iter__(self):
        def batches():
            yield from self._build()  # built at the first next(): start_iter and seed are final then
        return batches()


def build_resumable_train_loader(cfg, dicts: List[dict], mapper: Callable) -> ResumableTrainLoader:
    """The training loader of regionclip_d2 for ``dicts`` (detection or caption data):
    ``cfg.SOLVER.IMS_PER_BATCH``, ``DATALOADER.NUM_WORKERS``, ``ASPECT_RATIO_GROUPING``,
    ``SAMPLER_TRAIN`` (``TrainingSampler`` or ``RepeatFactorTrainingSampler`` with
    ``REPEAT_THRESHOLD``), ``MAX_BAD_SAMPLE_FRACTION``, ``MIN_BAD_SAMPLES_TOLERATED``; seeded
    from ``cfg.SEED`` unless the trainer sets ``loader.seed``."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    repeat_factors = None
    if name == "RepeatFactorTrainingSampler":
        repeat_factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dicts, cfg.DATALOADER.REPEAT_THRESHOLD)
    elif name != "TrainingSampler":
        raise ValueError(f"DATALOADER.SAMPLER_TRAIN={name!r} is not supported: use TrainingSampler or "
                         "RepeatFactorTrainingSampler")
    logger.info("training sampler: %s, %d samples", name, len(dicts))
    dataset = SafeMappedDataset(dicts, mapper, cfg.DATALOADER.MAX_BAD_SAMPLE_FRACTION,
                                min_bad_tolerated=cfg.DATALOADER.MIN_BAD_SAMPLES_TOLERATED)
    return ResumableTrainLoader(dataset, total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
                                seed=cfg.SEED if cfg.SEED >= 0 else None,
                                aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
                                num_workers=cfg.DATALOADER.NUM_WORKERS, repeat_factors=repeat_factors)
