#!/usr/bin/env python
"""Train or evaluate RegionCLIP detectors with detectron2.

  python tools/train_net.py --config-file CONFIG [--num-gpus N] [--resume] [KEY VALUE ...]
  python tools/train_net.py --eval-only --config-file CONFIG MODEL.WEIGHTS ckpt.pth [KEY VALUE ...]

Evaluation runs on every data set in DATASETS.TEST (COCO-style AP with the official
evaluator, novel/base/all when the data set marks its classes; LVIS AP/APr/APc/APf; or, for
a grounding data set, phrase recall@1/5/10 with each caption's phrases as the classes)
and writes the results as JSON to OUTPUT_DIR/inference/<data set>/results.json.
Multi-process runs go through detectron2's launch (torch.distributed): --num-gpus,
--num-machines, --machine-rank, --dist-url; on a machine without CUDA, --num-gpus N
starts N CPU processes (gloo).
"""
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import detectron2.utils.comm as comm  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from regionclip_d2 import RegionCLIPCheckpointer, get_regionclip_cfg  # noqa: E402
from regionclip_d2.engine import RegionCLIPTrainer, launch  # noqa: E402

logger = logging.getLogger("regionclip_d2.train_net")


def parse_register_specs(specs, option: str, form: str):
    """``NAME=FILE:IMAGE_ROOT`` specs of ``option`` -> ``(name, file, image_root)`` tuples; a
    malformed one stops with the expected ``form``."""
    out = []
    for spec in specs or []:
        name, sep, rest = spec.partition("=")
        path, sep2, image_root = rest.rpartition(":")
        if not sep or not sep2 or not name or not path:
            raise SystemExit(f"{option} {spec!r}: expected {form}")
        out.append((name, path, image_root))
    return out


def register_datasets(specs, category_splits=()):
    """``NAME=ANNOTATIONS.json:IMAGE_ROOT`` -> a registered COCO-format data set;
    ``category_splits``: ``NAME=SPLIT`` keeps only the categories marked with that split."""
    from regionclip_d2.data.datasets import register_coco_format

    splits = {}
    for spec in category_splits or []:
        name, sep, split = spec.partition("=")
        if not sep or not name or not split:
            raise SystemExit(f"--categories {spec!r}: expected NAME=SPLIT (e.g. world_train=base)")
        splits[name] = split
    for name, json_file, image_root in parse_register_specs(specs, "--register", "NAME=ANNOTATIONS.json:IMAGE_ROOT"):
        register_coco_format(name, json_file, image_root, category_split=splits.get(name))


def register_caption_datasets(specs):
    """``NAME=CAPTIONS_FILE:IMAGE_ROOT`` -> a registered image-caption data set."""
    from regionclip_d2.data.captions import register_caption_dataset

    for name, path, image_root in parse_register_specs(specs, "--register-captions", "NAME=CAPTIONS_FILE:IMAGE_ROOT"):
        register_caption_dataset(name, path, image_root)


def register_grounding_datasets(specs):
    """``NAME=GROUNDING.json:IMAGE_ROOT`` -> a registered grounding data set (MDETR format)."""
    from regionclip_d2.grounding.data import register_grounding_dataset

    for name, path, image_root in parse_register_specs(specs, "--register-grounding", "NAME=GROUNDING.json:IMAGE_ROOT"):
        register_grounding_dataset(name, path, image_root)


def setup(args):
    register_datasets(args.register, args.categories)
    register_caption_datasets(args.register_captions)
    register_grounding_datasets(args.register_grounding)
    cfg = get_regionclip_cfg(args.config_file, args.opts)
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE.startswith("cuda"):
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    default_setup(cfg, args)
    # regionclip_d2's own messages (data loading, resume replay) in the console and OUTPUT_DIR/log.txt
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="regionclip_d2")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        random_weights = not cfg.MODEL.WEIGHTS and not cfg.MODEL.CLIP.CLIP_WEIGHTS
        if random_weights:
            logger.warning("evaluating a model with RANDOM weights: set MODEL.WEIGHTS or MODEL.CLIP.CLIP_WEIGHTS")
            if cfg.SEED < 0:  # as in tools/demo.py: a random-weight run gives the same numbers every time
                torch.manual_seed(0)
        model = RegionCLIPTrainer.build_model(cfg)
        if cfg.MODEL.WEIGHTS:
            RegionCLIPCheckpointer(model, cfg.OUTPUT_DIR, trusted=cfg.MODEL.CLIP.TRUST_CHECKPOINTS).resume_or_load(
                cfg.MODEL.WEIGHTS, resume=args.resume)
        return RegionCLIPTrainer.test(cfg, model)
    trainer = RegionCLIPTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def build_parser():
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument("--register", action="append", metavar="NAME=ANNOTATIONS.json:IMAGE_ROOT",
                        help="register a COCO-format data set (repeatable), then name it in DATASETS.TEST/TRAIN")
    parser.add_argument("--categories", action="append", metavar="NAME=SPLIT",
                        help="keep only the categories of a registered data set whose 'split' is SPLIT "
                             "(e.g. a training file listing novel classes without boxes: NAME=base)")
    parser.add_argument("--register-captions", action="append", metavar="NAME=CAPTIONS_FILE:IMAGE_ROOT",
                        help="register an image-caption data set (COCO Captions .json, .jsonl or .tsv) for "
                             "region-text pretraining (repeatable), then name it in DATASETS.TRAIN")
    parser.add_argument("--register-grounding", action="append", metavar="NAME=GROUNDING.json:IMAGE_ROOT",
                        help="register a grounding data set (MDETR format: images with a 'caption', annotations with "
                             "'tokens_positive'; repeatable): in DATASETS.TRAIN it trains the grounding head "
                             "(MODEL.GROUNDING.ENABLED), in DATASETS.TEST it gives phrase recall@1/5/10")
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
