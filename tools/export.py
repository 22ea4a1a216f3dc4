#!/usr/bin/env python
"""Export a detector's recognition branch to ONNX with the vocabulary folded into the classifier.

The graph takes an image (uint8 RGB [3, H, W], resized as the detector resizes its input) and
boxes ([N, 4] XYXY in that image's pixels) and returns class probabilities [N, C + 1] (background
last), the boxes refined by the box regression, and L2-normalised region embeddings [N, D]. The
vocabulary's text embeddings are a constant matrix inside it (YOLO-World's re-parameterisation):
no text encoder is needed at run time. Proposals come from outside (ground-truth boxes, a user's
clicks, any RPN); the RPN branch and the fusion with its objectness are not part of the graph.

Writes <output>/recognition.onnx and <output>/recognition.json (class names, input preparation,
post-processing settings, the measured agreement with PyTorch), with --pt2 also the
torch.export program (recognition.pt2). regionclip_d2.export.OnnxRecognizer runs the file.

After `make demo`, its detector with the world's 12 shapes:
  python tools/export.py --synthetic output/synthetic_demo --output output/export

Example:
  python tools/export.py --config-file configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml \\
      --output exported/ --vocabulary custom --custom-vocabulary "cat,remote control,couch" \\
      --opts MODEL.WEIGHTS regionclip_pretrained-cc_rn50.pth MODEL.CLIP.CLIP_WEIGHTS RN50.pt
"""
import argparse
import logging
import os
import sys

DEFAULT_CONFIG = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", default=None, help=f"detector config (default: {DEFAULT_CONFIG})")
    ap.add_argument("--output", required=True, help="folder for recognition.onnx and recognition.json")
    ap.add_argument("--vocabulary", default="coco_ovd_all",
                    help="coco | lvis | coco_ovd_all | coco_ovd_base | coco_ovd_novel | custom (default: %(default)s)")
    ap.add_argument("--custom-vocabulary", default="", help='comma-separated class names for --vocabulary custom, '
                    'e.g. "cat,remote,couch", or a .txt/.json file of names')
    ap.add_argument("--synthetic", default=None, metavar="DIR",
                    help="export the detector of a finished synthetic demo run (e.g. output/synthetic_demo) with its "
                         "world's 12 shapes as the vocabulary (unless --vocabulary custom); leave out --config-file")
    ap.add_argument("--compare-test-images", type=int, default=0, metavar="N",
                    help="with --synthetic: run the exported file (regionclip_d2.export.OnnxRecognizer) and the "
                         "PyTorch detector on the first N test images with their ground-truth boxes and report "
                         "whether the detections agree, and the time each took")
    ap.add_argument("--pt2", action="store_true", help="also save the torch.export program (recognition.pt2)")
    ap.add_argument("--no-check", action="store_true",
                    help="skip running the file with onnxruntime against PyTorch (done by default)")
    ap.add_argument("--random-weights", action="store_true",
                    help="export randomly initialised weights (a smoke test; the graph's outputs are meaningless)")
    ap.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    args = ap.parse_args(argv)
    if args.compare_test_images and not args.synthetic:
        ap.error("--compare-test-images needs --synthetic (the synthetic world's test split has the boxes)")
    if args.synthetic and args.config_file:
        ap.error("--synthetic picks the run's own config and weights: leave out --config-file (use --opts for "
                 "other overrides)")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from detectron2.utils.logger import setup_logger

    from regionclip_d2 import Detector, get_regionclip_cfg
    from regionclip_d2.api import DetectorInputError
    from regionclip_d2.data.vocabularies import VocabularyError, load_vocabulary
    from regionclip_d2.export import export_detector

    setup_logger(name="regionclip_d2")
    logger = logging.getLogger("regionclip_d2.export")
    config, opts = args.config_file or DEFAULT_CONFIG, list(args.opts)
    if args.synthetic:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from synthetic_pipeline import finished_run_settings

        s = finished_run_settings(args.synthetic, "export", ensemble=False)  # the graph has no score ensemble
        world_test = s["world_test"]
        config, opts = s["config"], s["opts"] + opts
        if args.vocabulary != "custom":
            args.vocabulary, args.custom_vocabulary = "custom", s["vocabulary"].replace(", ", ",")
    if args.vocabulary == "custom":
        if not args.custom_vocabulary:
            raise SystemExit("export: --vocabulary custom needs --custom-vocabulary 'a,b,c'")
        vocabulary = args.custom_vocabulary if os.path.isfile(args.custom_vocabulary) \
            else args.custom_vocabulary.split(",")
    else:
        vocabulary = args.vocabulary
    try:
        names = load_vocabulary(vocabulary)
    except (VocabularyError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"export: {e}") from None
    cfg = get_regionclip_cfg(config, opts)
    cfg.defrost()
    # the graph classifies given boxes: no RPN branch is built (nor its weights needed)
    cfg.MODEL.CLIP.CROP_REGION_TYPE = "GT"
    cfg.MODEL.CLIP.VOCABULARY = cfg.MODEL.CLIP.OPENSET_TEST_VOCABULARY = ""
    cfg.MODEL.CLIP.TEXT_EMB_PATH = cfg.MODEL.CLIP.OPENSET_TEST_TEXT_EMB_PATH = ""
    cfg.MODEL.CLIP.OPENSET_TEST_NUM_CLASSES = 0
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(names)
    random = not cfg.MODEL.WEIGHTS and not cfg.MODEL.CLIP.CLIP_WEIGHTS
    if random and not args.random_weights:
        raise SystemExit("export: no weights given (MODEL.WEIGHTS / MODEL.CLIP.CLIP_WEIGHTS). Pass them with --opts, "
                         "or add --random-weights to export random weights as a smoke test.")
    if random:
        bar = "!" * 78
        logger.warning("\n%s\n!! THE WEIGHTS ARE RANDOM: the exported graph's scores are meaningless;\n"
                       "!! this only shows that export runs. Give real weights with --opts.\n%s", bar, bar)
    try:
        det = Detector.from_config(cfg, device="cpu", allow_random_weights=args.random_weights)
        path = os.path.join(args.output, "recognition.onnx")
        logger.info("exporting %d classes to %s (about 20 s for a tiny model, minutes for RN50x4)", len(names), path)
        info = export_detector(det, path, classes=names, check=not args.no_check, pt2=args.pt2,
                               extra_info={"config": config, "opts": [str(o) for o in opts],
                                           "weights": cfg.MODEL.WEIGHTS, "clip_weights": cfg.MODEL.CLIP.CLIP_WEIGHTS,
                                           "random_weights": bool(random)})
    except (DetectorInputError, ValueError, ImportError) as e:
        raise SystemExit(f"export: {e}") from None
    logger.info("wrote %s and %s", path, path[:-5] + ".json")
    if "check" in info:
        logger.info("onnxruntime vs PyTorch, largest absolute differences: %s", info["check"]["max_abs_diff"])
    if args.compare_test_images:
        print(compare_on_test_images(det, names, path, world_test, args.compare_test_images))
    return 0


def compare_on_test_images(det, names, path, world_test, n):
    """The exported file against the PyTorch detector ``det`` (built here in GT mode) on the first
    ``n`` test images of a synthetic world with their ground-truth boxes: agreement and time."""
    import json
    import time

    import numpy as np

    from regionclip_d2.data.images import read_image
    from regionclip_d2.export import OnnxRecognizer

    with open(os.path.join(os.path.dirname(world_test), "annotations", "instances_test.json")) as f:
        gt = json.load(f)
    boxes = {}
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        boxes.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
    runner = OnnxRecognizer(path)
    same = total = 0
    worst, t_torch, t_onnx = 0.0, 0.0, 0.0
    for im in [im for im in gt["images"] if im["id"] in boxes][:n]:
        rgb = read_image(os.path.join(world_test, im["file_name"]), format="RGB")
        t = time.perf_counter()
        ref = det(rgb, classes=names, boxes=boxes[im["id"]], threshold=0.0)
        t_torch += time.perf_counter() - t
        t = time.perf_counter()
        got = runner(rgb, boxes[im["id"]])
        t_onnx += time.perf_counter() - t
        total += 1
        if len(got) == len(ref.scores) and got.pred_classes.tolist() == list(ref.label_ids):
            same += 1
            if len(got):
                worst = max(worst, float(np.abs(got.scores.numpy() - ref.scores).max()))
    return (f"{same}/{total} test images with the same detections from onnxruntime and PyTorch (ground-truth "
            f"boxes; scores within {worst:.1e}); time onnxruntime {t_onnx:.2f} s, PyTorch {t_torch:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
