#!/usr/bin/env python
"""Open-vocabulary detection demo: detect any vocabulary in images with a CLIPFastRCNN.

Writes, for each input image <name>.<ext>, <output>/<name>_<ext>.jpg (boxes and labels
drawn by detectron2's Visualizer) and <output>/<name>_<ext>.json (the detections); inputs
are never overwritten and names never collide. Inputs are checked before any model work;
the exit status is 1 when no input could be processed.

Images are read as in training and evaluation (regionclip_d2.data.images.read_image): any
pixel mode becomes 8-bit RGB (16-bit images scaled, palette and CMYK converted,
transparency dropped), and the EXIF orientation is applied, as there is no annotation to
say otherwise, so boxes refer to the upright image a viewer shows (its height and width
are in the JSON).

Example:
  python tools/demo.py --config-file configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml \\
      --input photos/ --output out/ --vocabulary custom --custom-vocabulary "cat,remote,couch" \\
      --opts MODEL.WEIGHTS regionclip_rn50.pth MODEL.CLIP.BB_RPN_WEIGHTS rpn_coco_48.pth

Per-class thresholds: --class-thresholds thresholds.json with {"cat": 0.5, "remote": 0.2}; classes
the file does not name keep --confidence-threshold.

Grounding a caption (a detector built with MODEL.GROUNDING.ENABLED True, weights trained with it):
--caption "a red mug next to the laptop" makes the caption's noun phrases the classes; each
detection's JSON names its phrase and the phrase's character span, and the picture labels boxes
with phrases.
"""
import argparse
import glob
import json
import logging
import os
import sys

DEFAULT_CONFIG = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", default=DEFAULT_CONFIG, help="detector config (default: %(default)s)")
    ap.add_argument("--input", nargs="+", required=True, help="image files, globs or folders")
    ap.add_argument("--output", required=True, help="folder for the visualised images and JSON files")
    ap.add_argument("--vocabulary", default="coco_ovd_all",
                    help="coco | lvis | coco_ovd_all | coco_ovd_base | coco_ovd_novel | custom (default: %(default)s)")
    ap.add_argument("--custom-vocabulary", default="", help='comma-separated class names for --vocabulary custom, '
                    'e.g. "cat,remote,couch", or a .txt/.json file of names')
    ap.add_argument("--confidence-threshold", type=float, default=0.3, help="minimum score drawn and saved "
                    "(with --class-thresholds: for the classes the file does not name)")
    ap.add_argument("--class-thresholds", default="", metavar="FILE.json",
                    help='per-class minimum scores, a JSON object {"class name": score, ...} (e.g. written from '
                    "regionclip_d2.evaluation.thresholds.calibrate_thresholds); other classes use "
                    "--confidence-threshold")
    ap.add_argument("--caption", default=None, metavar="TEXT",
                    help="ground this caption's noun phrases instead of a vocabulary (needs a grounding detector: "
                         "MODEL.GROUNDING.ENABLED True)")
    ap.add_argument("--random-weights", action="store_true",
                    help="run with randomly initialised weights (a smoke test; detections are meaningless)")
    ap.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    ap.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return ap.parse_args(argv)


def list_inputs(specs):
    files = []
    for spec in specs:
        if os.path.isdir(spec):
            files += sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(IMAGE_EXTS))
        elif any(ch in spec for ch in "*?["):
            files += sorted(glob.glob(spec))
        elif os.path.isfile(spec):
            files.append(spec)
        else:
            raise SystemExit(f"demo: input {spec!r} is not a file, folder or glob that matches anything")
    if not files:
        raise SystemExit(f"demo: no images found in {specs}")
    return files


def check_images(files):
    """Decode each input's header (PIL ``verify``) before any model work: returns the readable
    files and ``(path, reason)`` for the others."""
    from PIL import Image

    good, bad = [], []
    for path in files:
        try:
            with Image.open(path) as im:
                im.verify()
            good.append(path)
        except Exception as e:  # PIL raises many types for damaged or non-image files
            bad.append((path, f"{type(e).__name__}: {e}"))
    return good, bad


def output_names(files, output_dir):
    """A distinct output stem per input, never the name of an input: ``photo.png`` ->
    ``photo_png`` (so ``a.png`` and ``a.jpg`` do not collide), with ``-2``, ``-3``, ...
    appended when two inputs would still share a name or an output would overwrite an input."""
    inputs = {os.path.realpath(f) for f in files}
    used, stems = set(), []
    for path in files:
        stem, ext = os.path.splitext(os.path.basename(path))
        base = f"{stem}_{ext.lstrip('.').lower()}" if ext else stem
        cand, k = base, 1
        while cand in used or any(os.path.realpath(os.path.join(output_dir, cand + e)) in inputs
                                  for e in (".jpg", ".json")):
            k += 1
            cand = f"{base}-{k}"
        used.add(cand)
        stems.append(cand)
    return stems


def main(argv=None):
    args = parse_args(argv)
    files, bad = check_images(list_inputs(args.input))
    for path, reason in bad:
        print(f"demo: skipping {path}: not a readable image ({reason})", file=sys.stderr)
    if not files:
        raise SystemExit(f"demo: none of the {len(bad)} input(s) is a readable image; nothing to do")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    from detectron2.engine import DefaultPredictor
    from detectron2.utils.logger import setup_logger
    from detectron2.utils.visualizer import Visualizer

    from regionclip_d2 import get_regionclip_cfg
    from regionclip_d2.api.results import merge_same_box_labels
    from regionclip_d2.data.images import read_image

    setup_logger(name="regionclip_d2")
    logger = logging.getLogger("regionclip_d2.demo")
    if args.vocabulary == "custom":
        if not args.custom_vocabulary:
            raise SystemExit("demo: --vocabulary custom needs --custom-vocabulary 'a,b,c'")
        vocabulary = args.custom_vocabulary if os.path.isfile(args.custom_vocabulary) \
            else [n for n in args.custom_vocabulary.split(",")]
    else:
        vocabulary = args.vocabulary
    from regionclip_d2.data.vocabularies import VocabularyError, load_vocabulary
    from regionclip_d2.evaluation.thresholds import class_thresholds, load_class_thresholds

    try:
        names = load_vocabulary(vocabulary)
        per_class = load_class_thresholds(args.class_thresholds) if args.class_thresholds \
            else args.confidence_threshold
        thresholds = torch.as_tensor(class_thresholds(per_class, names, default=args.confidence_threshold),
                                     dtype=torch.float32)
    except (VocabularyError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"demo: {e}") from None
    cfg = get_regionclip_cfg(args.config_file, args.opts)
    cfg.defrost()
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    # the vocabulary is set on the predictor below; the config's one is not needed
    cfg.MODEL.CLIP.VOCABULARY = ""
    cfg.MODEL.CLIP.OPENSET_TEST_VOCABULARY = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(names)
    random = not cfg.MODEL.WEIGHTS and not cfg.MODEL.CLIP.CLIP_WEIGHTS
    rpn_random = (cfg.MODEL.CLIP.CROP_REGION_TYPE == "RPN" and not cfg.MODEL.CLIP.BB_RPN_WEIGHTS
                  and not cfg.MODEL.WEIGHTS)
    if (random or rpn_random) and not args.random_weights:
        raise SystemExit("demo: no weights given (MODEL.WEIGHTS / MODEL.CLIP.CLIP_WEIGHTS"
                         + (", MODEL.CLIP.BB_RPN_WEIGHTS" if rpn_random else "") + "). Pass them with --opts, "
                         "or add --random-weights to run a smoke test with random weights.")
    if random or rpn_random:
        bar = "!" * 78
        logger.warning("\n%s\n!! THE WEIGHTS ARE RANDOM (%s). Boxes and labels below are meaningless:\n"
                       "!! this only shows that the pipeline runs. Give real weights with --opts.\n%s",
                       bar, "recognition" if random and not rpn_random else
                       ("RPN branch" if not random else "recognition and RPN branch"), bar)
    cfg.freeze()
    torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)  # random weights, if any, are reproducible
    predictor = DefaultPredictor(cfg)
    caption = None
    if args.caption is not None:
        head = predictor.model.roi_heads.box_predictor
        if not hasattr(head, "set_caption"):
            raise SystemExit("demo: --caption needs a grounding detector: set MODEL.GROUNDING.ENABLED True (config "
                             "or --opts) and give weights trained with it; this detector scores a class vocabulary")
        try:
            names = head.set_caption(args.caption)
        except ValueError as e:  # no noun phrase, empty, longer than the text context
            raise SystemExit(f"demo: --caption: {e}") from None
        caption = head.caption
        try:  # --class-thresholds, if given, names phrases
            thresholds = torch.as_tensor(class_thresholds(per_class, names, default=args.confidence_threshold),
                                         dtype=torch.float32)
        except ValueError as e:
            raise SystemExit(f"demo: {e}") from None
        logger.info("grounding %d phrase(s) of the caption: %s", len(names), names)
    else:
        predictor.model.set_vocabulary(names)
    os.makedirs(args.output, exist_ok=True)
    from tqdm import tqdm

    done, failed = 0, [p for p, _ in bad]
    for path, stem in zip(tqdm(files, desc="images", unit="img"), output_names(files, args.output)):
        try:
            image = read_image(path, format="BGR")
        except Exception as e:
            logger.error("skipping %s: cannot read it as an image (%s)", path, e)
            failed.append(path)
            continue
        inst = predictor(image)["instances"].to("cpu")
        inst = inst[inst.scores >= thresholds[inst.pred_classes]]
        scale = max(1.0, 512.0 / max(image.shape[:2]))  # small images are drawn larger, so labels stay legible
        vis = Visualizer(image[:, :, ::-1], metadata=None, scale=scale)
        vis._default_font_size *= 2  # detectron2 sizes labels for photos; at 512 px they were hard to read
        labels = [f"{names[c]} {s:.2f}" for c, s in zip(inst.pred_classes.tolist(), inst.scores.tolist())]
        boxes, labels, _ = merge_same_box_labels(inst.pred_boxes.tensor.numpy(), labels)
        drawn = vis.overlay_instances(boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4), labels=labels)
        drawn.save(os.path.join(args.output, stem + ".jpg"))
        dets = [{"box_xyxy": [round(v, 2) for v in b], "score": round(s, 4), "class_id": c, "class_name": names[c]}
                for b, s, c in zip(inst.pred_boxes.tensor.tolist(), inst.scores.tolist(), inst.pred_classes.tolist())]
        record = {"image": path, "height": image.shape[0], "width": image.shape[1],
                  "random_weights": bool(random or rpn_random), "detections": dets}
        if caption is not None:
            for d in dets:
                d["phrase"], d["span"] = names[d["class_id"]], list(caption.char_spans[d["class_id"]])
            record["caption"] = caption.caption
            record["phrases"] = [{"phrase": p, "span": list(sp)} for p, sp in zip(caption.phrases, caption.char_spans)]
        with open(os.path.join(args.output, stem + ".json"), "w") as f:
            json.dump(record, f, indent=1)
        logger.info("%s: %d detection(s) -> %s", path, len(dets), os.path.join(args.output, stem + ".jpg"))
        done += 1
    if failed:
        print(f"demo: {len(failed)} of {len(failed) + done} input(s) failed: {', '.join(failed[:5])}"
              + (" ..." if len(failed) > 5 else ""), file=sys.stderr)
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
