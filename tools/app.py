#!/usr/bin/env python
"""Serve the web app: open-vocabulary detection in a browser (http://127.0.0.1:7860 by default).

On the page: upload an image or pick a sample, type class names (comma-separated), move the
score threshold, optionally drag an exemplar box (a class given by example, with a name), and
see the picture with labelled boxes and a table of the detections. Bad input gets a message on
the page; the server keeps serving. The model is regionclip_d2.Detector, built once at start.

Without weights the detector runs with RANDOM weights, a smoke test whose detections are
meaningless: the page says so in a red banner (this is what `make app` does):
  python tools/app.py --opts MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST 100 MODEL.CLIP.PROMPT_TEMPLATES single

With weights (as for tools/demo.py; --opts takes any other config overrides, and comes last):
  python tools/app.py --weights regionclip_rn50.pth --rpn-weights rpn_lvis_866.pth --clip-weights RN50.pt

The synthetic demo's trained detector (after `make demo`), with its world's test images as samples:
  python tools/app.py --synthetic output/synthetic_demo

Samples: the first test images of the synthetic world (output/synthetic_demo/world/test, when it
exists) and the photos scikit-image ships (chelsea.png, astronaut.png, coffee.png).
Limits: see regionclip_d2/app/server.py (uploads up to 25 MB and 30 megapixels, up to 1500 names).
"""
import argparse
import logging
import os
import socket
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml"  # as tools/demo.py
DEFAULT_WORLD_TEST = os.path.join(ROOT, "output", "synthetic_demo", "world", "test")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", default=None, help=f"detector config (default: {DEFAULT_CONFIG})")
    ap.add_argument("--weights", default=None, help="detector / RegionCLIP checkpoint (MODEL.WEIGHTS)")
    ap.add_argument("--rpn-weights", default=None, help="RPN branch checkpoint (MODEL.CLIP.BB_RPN_WEIGHTS)")
    ap.add_argument("--clip-weights", default=None, help="CLIP weights (MODEL.CLIP.CLIP_WEIGHTS)")
    ap.add_argument("--synthetic", default=None, metavar="DIR",
                    help="serve the detector of a finished synthetic demo run (e.g. output/synthetic_demo): its "
                    "config, weights and world; not combined with --config-file or the weight options")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 "
                    "makes the app reachable from other machines)")
    ap.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    ap.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    ap.add_argument("--vocabulary", default=None, help="the vocabulary the page starts with (comma-separated)")
    ap.add_argument("--threshold", type=float, default=None, help="the threshold the page starts with "
                    "(default: 0.3; the synthetic demo's with --synthetic)")
    ap.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ... (last)")
    args = ap.parse_args(argv)
    if args.synthetic and (args.config_file or args.weights or args.rpn_weights or args.clip_weights):
        ap.error("--synthetic picks the run's own config and weights: leave out --config-file, --weights, "
                 "--rpn-weights and --clip-weights (use --opts for other overrides)")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        ap.error(f"--threshold {args.threshold}: give a number from 0 to 1")
    return args


def synthetic_settings(run_dir: str) -> dict:
    """The detector of a finished synthetic demo run (``synthetic_pipeline.finished_run_settings``)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from synthetic_pipeline import finished_run_settings

    return finished_run_settings(run_dir, "app")


def check_port(host: str, port: int):
    """Fail early, before the model is built, when the port is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise SystemExit(f"app: cannot listen on {host}:{port} ({e.strerror}): another server may be using it; "
                             f"pass --port {port + 1}") from None


def main(argv=None):
    args = parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise SystemExit(f"app: {e.name} is not installed: run `make setup` (or pip install fastapi==0.163.2 "
                         "uvicorn==0.54.0)") from None
    check_port(args.host, args.port)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from detectron2.utils.logger import setup_logger

    from regionclip_d2 import Detector
    from regionclip_d2.api import DetectorInputError
    from regionclip_d2.app import create_app, default_samples

    setup_logger(name="regionclip_d2")
    logger = logging.getLogger("regionclip_d2.app")
    if args.synthetic:
        s = synthetic_settings(args.synthetic)
        config, opts, world_test, about = s["config"], s["opts"] + list(args.opts), s["world_test"], s["about"]
        vocabulary = args.vocabulary or s["vocabulary"]
        threshold = args.threshold if args.threshold is not None else s["threshold"]
    else:
        config, opts = args.config_file or DEFAULT_CONFIG, list(args.opts)
        world_test = DEFAULT_WORLD_TEST
        vocabulary = args.vocabulary or "cat, person, cup, plate, flower"
        threshold = args.threshold if args.threshold is not None else 0.3
        about = f"{os.path.basename(config)}, weights: {os.path.basename(args.weights) if args.weights else 'none'}"
    logger.info("building the detector from %s", config)
    torch.manual_seed(0)  # random weights, if any, are the same at every start
    try:
        det = Detector.from_config(config, weights=args.weights, rpn_weights=args.rpn_weights,
                                   clip_weights=args.clip_weights, device="cpu" if args.cpu else "auto", opts=opts,
                                   allow_random_weights=True)
    except (DetectorInputError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"app: cannot build the detector: {e}") from None
    if det.random_weights:
        bar = "!" * 78
        logger.warning("\n%s\n!! THE WEIGHTS ARE RANDOM (%s): the detections are meaningless (the page shows a "
                       "banner).\n!! Give real weights with --weights / --rpn-weights / --clip-weights.\n%s",
                       bar, det.random_weights, bar)
    samples = default_samples(world_test)
    first = None if args.synthetic or "chelsea.png" not in samples else "chelsea.png"  # a cat, for the vocabulary
    app = create_app(lambda: det, samples=samples, default_vocabulary=vocabulary, default_threshold=threshold,
                     default_sample=first, about=f"{about}; device: {det.device}")
    logger.info("serving on http://%s:%d (Ctrl+C to stop)", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
