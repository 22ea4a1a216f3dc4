"""The detectron2 trainer of regionclip_d2: RegionCLIP checkpoints, evaluators and loaders,
CPU multi-process runs."""
import contextlib
import json
import logging
import os
import weakref

import torch

import detectron2.engine.defaults as d2_defaults
import detectron2.utils.comm as comm
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import inference_on_dataset, print_csv_format

from ..checkpoint import RegionCLIPCheckpointer
from ..data.mappers import build_test_mapper, build_train_mapper
from ..evaluation import build_evaluator

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _cpu_ddp():
    """detectron2 0.6 wraps the model in DDP with ``device_ids=[local_rank]``, which
    DDP refuses for CPU modules; on CPU, wrap without device ids."""
    original = d2_defaults.create_ddp_model

    def create(model, *, fp16_compression=False, **kwargs):
        if comm.get_world_size() == 1 or torch.cuda.is_available():
            return original(model, fp16_compression=fp16_compression, **kwargs)
        return torch.nn.parallel.DistributedDataParallel(model, **kwargs)

    d2_defaults.create_ddp_model = create
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def match_vocabulary(model, dataset_name):
    """The model's test vocabulary must index the data set's classes: use the data set's
    class names when none is configured; refuse a mismatch."""
    model = unwrap(model)
    if not hasattr(getattr(model, "roi_heads", None), "box_predictor") or \
            not hasattr(model.roi_heads.box_predictor, "test_embeddings"):
        return  # not an open-vocabulary detector (e.g. the RPN branch's own training)
    names = list(MetadataCatalog.get(dataset_name).thing_classes)
    pred = model.roi_heads.box_predictor
    model.class_names  # embeds pending names-based vocabularies
    n = pred.test_embeddings.shape[0] or pred.train_embeddings.shape[0]
    if not n:
        logger.info("no vocabulary configured: embedding the %d class names of %s", len(names), dataset_name)
        model.set_vocabulary(names)
    elif n != len(names):
        raise ValueError(f"the model's test vocabulary has {n} classes but {dataset_name} has {len(names)}: set "
                         "MODEL.CLIP.OPENSET_TEST_TEXT_EMB_PATH / OPENSET_TEST_VOCABULARY (and "
                         "OPENSET_TEST_NUM_CLASSES) to the data set's classes")


class RegionCLIPTrainer(DefaultTrainer):
    """DefaultTrainer with regionclip_d2's checkpointer, mappers and evaluators."""

    def __init__(self, cfg):
        with _cpu_ddp():
            super().__init__(cfg)
        # our checkpointer: every weight format, weights-only loading unless trusted
        self.checkpointer = RegionCLIPCheckpointer(
            self._trainer.model, cfg.OUTPUT_DIR, trusted=cfg.MODEL.CLIP.TRUST_CHECKPOINTS,
            trainer=weakref.proxy(self))
        for h in self._hooks:
            if hasattr(h, "checkpointer"):
                h.checkpointer = self.checkpointer

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        if cfg.MODEL.META_ARCHITECTURE == "PretrainFastRCNN":  # image-caption pairs
            from ..data.captions import build_caption_train_loader

            return build_caption_train_loader(cfg)
        return build_detection_train_loader(cfg, mapper=build_train_mapper(cfg))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=build_test_mapper(cfg))

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        results = {}
        was_training = model.training
        for name in cfg.DATASETS.TEST:
            loader = cls.build_test_loader(cfg, name)  # loads the data set and its class names
            match_vocabulary(model, name)
            evaluator = cls.build_evaluator(cfg, name)
            res = inference_on_dataset(model, loader, evaluator)
            results[name] = res
            if comm.is_main_process():
                print_csv_format(res)
                out = os.path.join(cfg.OUTPUT_DIR, "inference", name)
                os.makedirs(out, exist_ok=True)
                with open(os.path.join(out, "results.json"), "w") as f:
                    json.dump(res, f, indent=1)
        model.train(was_training)
        return results
