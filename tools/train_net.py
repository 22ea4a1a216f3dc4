#!/usr/bin/env python
"""Train or evaluate RegionCLIP detectors with detectron2.

  python tools/train_net.py --config-file CONFIG [--num-gpus N] [--resume] [KEY VALUE ...]
  python tools/train_net.py --eval-only --config-file CONFIG MODEL.WEIGHTS ckpt.pth [KEY VALUE ...]

Evaluation runs on every data set in DATASETS.TEST (COCO-style AP with the official
evaluator, or LVIS AP/APr/APc/APf) and writes the results as JSON to
OUTPUT_DIR/inference/<data set>/results.json. Multi-process runs go through detectron2's
launch (torch.distributed): --num-gpus, --num-machines, --machine-rank, --dist-url.
"""
import json
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import detectron2.utils.comm as comm  # noqa: E402
from detectron2.data import MetadataCatalog, build_detection_test_loader  # noqa: E402
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.evaluation import inference_on_dataset, print_csv_format  # noqa: E402

from regionclip_d2 import RegionCLIPCheckpointer, get_regionclip_cfg  # noqa: E402
from regionclip_d2.data.mappers import build_test_mapper  # noqa: E402
from regionclip_d2.evaluation import build_evaluator  # noqa: E402

logger = logging.getLogger("regionclip_d2.train_net")


def match_vocabulary(model, dataset_name):
    """The model's test vocabulary must index the data set's classes: use the data set's
    class names when none is configured, refuse a mismatch."""
    model = model.module if hasattr(model, "module") else model
    names = list(MetadataCatalog.get(dataset_name).thing_classes)
    pred = model.roi_heads.box_predictor
    current = model.class_names if (pred.test_embeddings.shape[0] or pred.train_embeddings.shape[0]
                                    or model._vocab_specs) else None
    n = pred.test_embeddings.shape[0] or pred.train_embeddings.shape[0] or (len(current) if current else 0)
    if not n:
        logger.info("no vocabulary configured: embedding the %d class names of %s", len(names), dataset_name)
        model.set_vocabulary(names)
    elif n != len(names):
        raise ValueError(f"the model's test vocabulary has {n} classes but {dataset_name} has {len(names)}: set "
                         "MODEL.CLIP.OPENSET_TEST_TEXT_EMB_PATH / OPENSET_TEST_VOCABULARY (and "
                         "OPENSET_TEST_NUM_CLASSES) to the data set's classes")


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=build_test_mapper(cfg))

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        results = {}
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
        return results


def register_datasets(specs):
    """``NAME=ANNOTATIONS.json:IMAGE_ROOT`` -> a registered COCO-format data set."""
    from regionclip_d2.data.datasets import register_coco_format

    for spec in specs or []:
        name, sep, rest = spec.partition("=")
        json_file, sep2, image_root = rest.rpartition(":")
        if not sep or not sep2 or not name or not json_file:
            raise SystemExit(f"--register {spec!r}: expected NAME=ANNOTATIONS.json:IMAGE_ROOT")
        register_coco_format(name, json_file, image_root)


def setup(args):
    register_datasets(args.register)
    cfg = get_regionclip_cfg(args.config_file, args.opts)
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE.startswith("cuda"):
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        if cfg.MODEL.WEIGHTS:
            RegionCLIPCheckpointer(model, cfg.OUTPUT_DIR, trusted=cfg.MODEL.CLIP.TRUST_CHECKPOINTS).resume_or_load(
                cfg.MODEL.WEIGHTS, resume=args.resume)
        elif not cfg.MODEL.CLIP.CLIP_WEIGHTS:
            logger.warning("evaluating a model with RANDOM weights: set MODEL.WEIGHTS or MODEL.CLIP.CLIP_WEIGHTS")
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument("--register", action="append", metavar="NAME=ANNOTATIONS.json:IMAGE_ROOT",
                        help="register a COCO-format data set (repeatable), then name it in DATASETS.TEST/TRAIN")
    args = parser.parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
