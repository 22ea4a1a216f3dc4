"""Image-caption data sets (COCO Captions, CC3M-style JSON Lines / TSV) for region-text
pretraining, as detectron2 data sets.

* :func:`register_caption_dataset` registers a caption file + image folder; its dicts are
  ``{"file_name", "image_id", "captions": [str, ...], "height"?, "width"?}``, one per image
  (all captions of an image grouped, in file order).
* :class:`CaptionDatasetMapper` decodes and resizes an image and picks a caption.
* :func:`build_caption_train_loader` builds the training loader of ``cfg.DATASETS.TRAIN``;
  it skips images that fail to decode (see :mod:`regionclip_d2.data.loader`).
"""
import collections
import logging
import os
import random
from typing import Dict, List, Optional

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T

from .concepts import DEFAULT_MAX_CHARS, format_stats, iter_caption_records, new_stats
from .images import annotated_size, read_image

logger = logging.getLogger(__name__)


class BadImageError(RuntimeError):
    """An image of a caption data set that cannot be read or decoded."""


def load_caption_dicts(captions_path: str, image_root: str, fmt: str = "auto",
                       max_chars: int = DEFAULT_MAX_CHARS, stats: Dict[str, int] = None) -> List[dict]:
    """Read a caption file into detectron2 dataset dicts, one per image.

    Returns:
        ``[{"file_name": image_root/<name>, "image_id", "captions": [str, ...],
        "height"?, "width"?}]`` in order of first appearance; ``image_id`` is the file's
        id where it has one (COCO), else the running index of the image. Captions without
        a file name are dropped (counted as ``no_file_name`` in ``stats``).
    """
    stats = new_stats() if stats is None else stats
    stats.setdefault("no_file_name", 0)
    images: Dict[str, dict] = collections.OrderedDict()
    for rec in iter_caption_records(captions_path, fmt, stats, max_chars=max_chars):
        name = rec.get("file_name")
        if not name:
            stats["no_file_name"] += 1
            continue
        path = name if os.path.isabs(name) else os.path.join(image_root, name)
        d = images.get(path)
        if d is None:
            d = {"file_name": path, "image_id": rec.get("image_id", len(images)), "captions": []}
            for k in ("height", "width"):
                if isinstance(rec.get(k), int) and rec[k] > 0:
                    d[k] = rec[k]
            images[path] = d
        d["captions"].append(rec["caption"])
    if stats["no_file_name"]:
        logger.warning("%s: %d caption(s) without an image file name were dropped", captions_path,
                       stats["no_file_name"])
    if not images:
        raise ValueError(f"caption file {captions_path!r} yielded no image with a caption ({format_stats(stats)}): "
                         "check the file and its format")
    logger.info("loaded %d images with %d captions from %s", len(images), stats["captions"], captions_path)
    return list(images.values())


def register_caption_dataset(name: str, captions_path: str, image_root: str, fmt: str = "auto",
                             max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Register an image-caption data set in detectron2's catalogs (replacing one of the
    same name): ``register_caption_dataset("cc3m_train", "cc3m.tsv", "cc3m/images")``,
    then ``DATASETS.TRAIN ("cc3m_train",)``. The file is read lazily, when the data set is
    first used. ``fmt``: ``auto`` | ``coco`` | ``jsonl`` | ``tsv``."""
    if not os.path.isfile(captions_path):
        raise FileNotFoundError(f"caption file {captions_path!r} for data set {name!r} does not exist")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image folder {image_root!r} for data set {name!r} does not exist")
    if fmt not in ("auto", "coco", "jsonl", "tsv"):
        raise ValueError(f"unknown caption format {fmt!r} for data set {name!r}: use auto, coco, jsonl or tsv")
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_caption_dicts(captions_path, image_root, fmt, max_chars))
    MetadataCatalog.get(name).set(captions_file=captions_path, image_root=image_root, caption_format=fmt)
    return name


def is_caption_dataset(name: str) -> bool:
    """Whether ``name`` was registered by :func:`register_caption_dataset`."""
    return MetadataCatalog.get(name).get("captions_file") is not None


class CaptionDatasetMapper:
    """Map a caption dataset dict to a model input.

    Output: ``{"file_name", "image_id", "image": uint8 tensor [3, H', W'] in
    ``image_format`` channel order (resized), "height", "width" (the original size, in
    pixels), "captions": [str, ...], "caption": one caption}``. ``caption`` is a random
    choice when training, the first caption otherwise.

    Construct from a config, ``CaptionDatasetMapper(cfg, is_train=True)`` (resizing with
    ``ResizeShortestEdge(INPUT.MIN_SIZE_TRAIN, INPUT.MAX_SIZE_TRAIN,
    INPUT.MIN_SIZE_TRAIN_SAMPLING)``, or the ``*_TEST`` sizes when not training), or from
    keyword arguments. An image that cannot be read returns ``None`` with
    ``skip_bad_images`` (counted in ``num_bad_images`` and logged), else raises
    :class:`BadImageError` naming the file.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, augmentations=(), image_format: str = "RGB",
                 skip_bad_images: bool = True):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        self.skip_bad_images = skip_bad_images
        self.num_bad_images = 0

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, skip_bad_images: bool = True):
        if is_train:
            augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                         cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
        else:
            augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
        return {"is_train": is_train, "augmentations": augs, "image_format": cfg.INPUT.FORMAT,
                "skip_bad_images": skip_bad_images}

    def _bad(self, file_name, err) -> None:
        if not self.skip_bad_images:
            raise BadImageError(f"cannot read image {file_name!r}: {err}") from err
        self.num_bad_images += 1
        n = self.num_bad_images
        if n <= 10 or n % 100 == 0:
            logger.warning("skipping unreadable image %r (%s): %d skipped so far in this process", file_name,
                           err, n)
        return None

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        d = dict(dataset_dict)
        file_name = d["file_name"]
        captions = list(d.get("captions") or ([d["caption"]] if d.get("caption") else []))
        if not captions:
            raise ValueError(f"dataset dict of {file_name!r} has no captions: caption data sets need a "
                             "'captions' list (see register_caption_dataset)")
        try:
            image = read_image(file_name, format=self.image_format, expected_size=annotated_size(d))
            if image.ndim != 3 or image.shape[0] < 1 or image.shape[1] < 1:
                raise ValueError(f"decoded to an array of shape {image.shape}")
        except Exception as e:  # noqa: BLE001  missing, truncated or corrupt files
            return self._bad(file_name, e)
        h, w = image.shape[:2]
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        image = aug_input.image
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        d["height"], d["width"] = h, w
        d["captions"] = captions
        d["caption"] = random.choice(captions) if self.is_train else captions[0]
        return d


def _train_dicts(names) -> List[dict]:
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ValueError("cfg.DATASETS.TRAIN is empty: register a caption data set with "
                         "register_caption_dataset and name it in DATASETS.TRAIN")
    dicts = []
    for name in names:
        if name not in DatasetCatalog.list():
            raise KeyError(f"data set {name!r} (cfg.DATASETS.TRAIN) is not registered: call "
                           "regionclip_d2.data.captions.register_caption_dataset first")
        part = DatasetCatalog.get(name)
        if part and "captions" not in part[0]:
            raise ValueError(f"data set {name!r} has no 'captions' in its dicts: it is not a caption data set")
        dicts.extend(part)
    return dicts


def build_caption_train_loader(cfg, mapper=None):
    """The training loader of the caption data sets in ``cfg.DATASETS.TRAIN``: an infinite,
    resumable stream of batches (lists of ``cfg.SOLVER.IMS_PER_BATCH`` / processes mapped
    dicts, see :class:`CaptionDatasetMapper`); unreadable images are skipped up to
    ``DATALOADER.MAX_BAD_SAMPLE_FRACTION`` and ``MIN_BAD_SAMPLES_TOLERATED`` (see
    :mod:`regionclip_d2.data.loader`)."""
    from .loader import build_resumable_train_loader

    if mapper is None:
        mapper = CaptionDatasetMapper(cfg, is_train=True, skip_bad_images=False)
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        logger.warning("DATALOADER.SAMPLER_TRAIN=%s is not supported for caption data (no class labels): "
                       "using TrainingSampler", cfg.DATALOADER.SAMPLER_TRAIN)
        cfg = cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"
    return build_resumable_train_loader(cfg, _train_dicts(cfg.DATASETS.TRAIN), mapper)
