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
from detectron2.data import MetadataCatalog, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import print_csv_format
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from ..checkpoint import RegionCLIPCheckpointer
from ..data.loader import ResumableTrainLoader, build_resumable_train_loader
from ..data.mappers import build_test_mapper, build_train_mapper
from ..evaluation import build_evaluator
from ..evaluation.unreadable import SkipUnreadableMapper, evaluate_skipping_unreadable
from .train_loop import GuardedTrainer

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
    if not hasattr(model, "prepare_vocabulary"):
        return  # not an open-vocabulary detector (e.g. the RPN branch's own training)
    if MetadataCatalog.get(dataset_name).get("evaluator_type") == "grounding":
        return  # grounding data: each image's caption phrases are its classes
    names = list(MetadataCatalog.get(dataset_name).thing_classes)
    pred = model.roi_heads.box_predictor
    model.prepare_vocabulary()
    n = len(pred.test_vocabulary) or len(pred.train_vocabulary)
    if not n:
        logger.info("no vocabulary configured: embedding the %d class names of %s", len(names), dataset_name)
        model.set_vocabulary(names)
    elif n != len(names):
        raise ValueError(f"the model's test vocabulary has {n} classes but {dataset_name} has {len(names)}: set "
                         "MODEL.CLIP.OPENSET_TEST_TEXT_EMB_PATH / OPENSET_TEST_VOCABULARY (and "
                         "OPENSET_TEST_NUM_CLASSES) to the data set's classes")


def training_dataset_dicts(cfg, filter_empty: bool) -> list:
    """The dicts of ``DATASETS.TRAIN``: detection data sets joined by detectron2 (their class
    lists must agree, and proposal files apply to them), then each grounding data set
    (captions; ``evaluator_type`` grounding) on its own: its categories need not be the
    detection data's, since its boxes are named by its captions' phrases."""
    grounding = [n for n in cfg.DATASETS.TRAIN if MetadataCatalog.get(n).get("evaluator_type") == "grounding"]
    detection = [n for n in cfg.DATASETS.TRAIN if n not in grounding]
    if grounding and cfg.MODEL.LOAD_PROPOSALS:
        raise ValueError(f"precomputed proposals (MODEL.LOAD_PROPOSALS) are not read for grounding data sets "
                         f"{grounding}: train on them without proposal files")
    dicts = get_detection_dataset_dicts(
        detection, filter_empty=filter_empty,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None) if detection else []
    for name in grounding:
        dicts = dicts + get_detection_dataset_dicts([name], filter_empty=filter_empty)
    return dicts


def periodic_checkpoints(output_dir: str):
    """Paths of ``model_<iteration>.pth`` in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = sorted(n for n in os.listdir(output_dir)
                   if n.startswith("model_") and n.endswith(".pth") and n[len("model_"):-4].isdigit())
    return [os.path.join(output_dir, n) for n in names]


class OutputDirInUseError(RuntimeError):
    pass


def lock_output_dir(output_dir: str):
    """Hold an exclusive lock on ``<output_dir>/.lock`` for the life of the process (the OS
    releases it when the process ends, even when killed); raise :class:`OutputDirInUseError`
    naming the process that holds it. Returns the open lock file (keep a reference)."""
    import fcntl

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, ".lock")
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise OutputDirInUseError(
            f"OUTPUT_DIR {output_dir} is in use by {holder}: two runs in one folder would interleave "
            "checkpoints and metrics.json. Wait for it to finish, stop it, or set another OUTPUT_DIR") from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {os.uname().nodename}\n")
    f.flush()
    return f


class RegionCLIPTrainer(DefaultTrainer):
    """DefaultTrainer with regionclip_d2's checkpointer, mappers, evaluators and loaders,
    and its training step (:class:`GuardedTrainer`): a run killed at any point and resumed
    with ``resume_or_load(resume=True)`` continues from its last complete checkpoint with the
    same data, the same random draws and the same optimizer and scheduler state as an
    uninterrupted run (exactly, with or without ``DATALOADER.ASPECT_RATIO_GROUPING``, on
    detection and caption data: see :mod:`regionclip_d2.data.loader`); bad samples are
    skipped up to ``DATALOADER.MAX_BAD_SAMPLE_FRACTION`` (at least ``MIN_BAD_SAMPLES_TOLERATED``);
    evaluation leaves out images it cannot read (``TEST.MAX_UNREADABLE_FRACTION``); non-finite
    losses stop the run or
    are skipped (``SOLVER.NONFINITE_LOSS``)."""

    def __init__(self, cfg):
        with _cpu_ddp():
            super().__init__(cfg)
        # one seed for the data stream and the per-step draws; saved in checkpoints, so that
        # an unseeded run (SEED < 0) also resumes exactly
        self.seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        t = self._trainer
        self._trainer = GuardedTrainer.from_config(cfg, t.model, t.data_loader, t.optimizer, seed=self.seed)
        self._set_loader_state()
        # our checkpointer: every weight format, weights-only loading unless trusted
        self.checkpointer = RegionCLIPCheckpointer(
            self._trainer.model, cfg.OUTPUT_DIR, trusted=cfg.MODEL.CLIP.TRUST_CHECKPOINTS,
            trainer=weakref.proxy(self))
        for h in self._hooks:
            if hasattr(h, "checkpointer"):
                h.checkpointer = self.checkpointer
            if hasattr(h, "max_to_keep") and cfg.SOLVER.CHECKPOINT_KEEP_LAST > 0:
                h.max_to_keep = keep = cfg.SOLVER.CHECKPOINT_KEEP_LAST
                # checkpoints of an earlier run count too: the newest are rotated out as new ones come
                old = periodic_checkpoints(cfg.OUTPUT_DIR)
                if comm.is_main_process():
                    for path in old[:-keep]:
                        os.remove(path)
                        logger.info("SOLVER.CHECKPOINT_KEEP_LAST %d: removed %s", keep, path)
                h.recent_checkpoints = old[-keep:]
        # one run per output folder: a second one would interleave checkpoints and metrics
        self._output_lock = lock_output_dir(cfg.OUTPUT_DIR) if comm.is_main_process() and cfg.OUTPUT_DIR else None

    def _set_loader_state(self):
        loader = self._trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            loader.seed, loader.start_iter = self.seed, self.start_iter
        self._trainer.seed = self.seed

    def resume_or_load(self, resume=True):
        if resume:
            self.checkpointer.remove_stale_temporaries()
        super().resume_or_load(resume=resume)
        self._set_loader_state()  # the data stream continues at start_iter

    def state_dict(self):
        # detectron2 0.6's DefaultTrainer leaves out the step's state: without it the
        # optimizer (momentum, Adam moments) would restart from zero on --resume
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        ret["seed"] = self.seed
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("the checkpoint has no optimizer state (written by an older version): the optimizer "
                           "restarts from its initial state")
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])

    @classmethod
    def build_optimizer(cls, cfg, model):
        """detectron2's SGD, or AdamW with ``SOLVER.OPTIMIZER ADAMW`` (same parameter groups:
        weight decay off for norms where WEIGHT_DECAY_NORM says so, bias lr factor; same
        gradient clipping). AdamW's steps do not scale with the gradient's size, which the
        logits of a cosine classifier at temperature 0.01 inflate 100-fold."""
        name = cfg.SOLVER.OPTIMIZER.upper()
        if name == "SGD":
            return super().build_optimizer(cfg, model)
        if name != "ADAMW":
            raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r}: use SGD or ADAMW")
        params = get_default_optimizer_params(model, base_lr=cfg.SOLVER.BASE_LR,
                                              weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
                                              bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
                                              weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS)
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(params, lr=cfg.SOLVER.BASE_LR,
                                                                    weight_decay=cfg.SOLVER.WEIGHT_DECAY)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        """A :class:`ResumableTrainLoader`: image-caption pairs for PretrainFastRCNN,
        detection data otherwise; CLIPSelf takes either (caption data sets when every
        ``DATASETS.TRAIN`` is one, else detection data, images without annotations kept)."""
        from ..data.captions import build_caption_train_loader, is_caption_dataset

        if cfg.MODEL.META_ARCHITECTURE == "PretrainFastRCNN":  # image-caption pairs
            return build_caption_train_loader(cfg)
        filter_empty = cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        if cfg.MODEL.META_ARCHITECTURE == "CLIPSelf":  # images only: captions / annotations are ignored
            if cfg.DATASETS.TRAIN and all(is_caption_dataset(n) for n in cfg.DATASETS.TRAIN):
                return build_caption_train_loader(cfg)
            filter_empty = False  # unlabelled images are training images too
        return build_resumable_train_loader(cfg, training_dataset_dicts(cfg, filter_empty), build_train_mapper(cfg))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's test loader with :func:`build_test_mapper`; an image that cannot be read
        becomes a placeholder naming it (:class:`SkipUnreadableMapper`) instead of an error."""
        grounding = MetadataCatalog.get(dataset_name).get("evaluator_type") == "grounding"
        return build_detection_test_loader(cfg, dataset_name,
                                           mapper=SkipUnreadableMapper(build_test_mapper(cfg, grounding)))

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate on every data set of ``DATASETS.TEST``; results also go to
        ``OUTPUT_DIR/inference/<name>/results.json``. Images that cannot be read are left out,
        logged and counted (``results[name]["images"]``; results.json also lists them under
        ``unreadable_images``) up to ``TEST.MAX_UNREADABLE_FRACTION``
        (see :mod:`regionclip_d2.evaluation.unreadable`)."""
        results = {}
        was_training = model.training
        for name in cfg.DATASETS.TEST:
            loader = cls.build_test_loader(cfg, name)  # loads the data set and its class names
            match_vocabulary(model, name)
            evaluator = cls.build_evaluator(cfg, name)
            res, unreadable = evaluate_skipping_unreadable(model, loader, evaluator, dataset_name=name,
                                                           max_fraction=cfg.TEST.MAX_UNREADABLE_FRACTION)
            results[name] = res
            if comm.is_main_process():
                print_csv_format(res)
                out = os.path.join(cfg.OUTPUT_DIR, "inference", name)
                os.makedirs(out, exist_ok=True)
                with open(os.path.join(out, "results.json"), "w") as f:
                    json.dump(dict(res, unreadable_images=unreadable), f, indent=1)
        model.train(was_training)
        return results
