#!/usr/bin/env python
"""Generate a synthetic open-vocabulary detection world (shapes on textured backgrounds).

Writes, under --output-dir:
  world.json                           the world's description (categories, base/novel split,
                                       colours, image size, seed, counts, fingerprint)
  train/ val/ test/                    PNG images
  annotations/instances_<split>.json   COCO instances; the train JSON has NO novel boxes
  annotations/captions_<split>.jsonl   {"file_name", "image_id", "caption"} per line; training
                                       captions name novel shapes too
  annotations/grounding_<split>.json   the captions' phrases and the boxes each names (MDETR's
                                       grounding format; train: no novel boxes)

Examples:
  python tools/make_synthetic_ovd.py --output-dir datasets/synthetic_ovd
  python tools/make_synthetic_ovd.py --output-dir /tmp/w --num-train 200 --image-size 96 \\
      --novel heart,moon --seed 1

Register a split for detectron2 with
  regionclip_d2.data.datasets.register_coco_format("world_val", "<dir>/annotations/instances_val.json", "<dir>/val")
"""
import argparse
import os
import sys
import time


def _names(text):
    return [t.strip() for t in text.split(",") if t.strip()] if text is not None else None


def main(argv=None):
    from regionclip_d2.synthetic.shapes import DEFAULT_CATEGORIES, DEFAULT_NOVEL, SHAPES
    from regionclip_d2.synthetic.world import generate_world
    from regionclip_d2.synthetic.world_config import WorldConfig, WorldConfigError

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", required=True, help="folder to write the world into (created)")
    ap.add_argument("--num-train", type=int, default=2000, help="training images (default: %(default)s)")
    ap.add_argument("--num-val", type=int, default=300, help="validation images (default: %(default)s)")
    ap.add_argument("--num-test", type=int, default=300, help="test images (default: %(default)s)")
    ap.add_argument("--image-size", type=int, default=128,
                    help="image side in px, a multiple of 32 in 96..320 (default: %(default)s)")
    ap.add_argument("--max-objects", type=int, default=4, help="objects per image at most (default: %(default)s)")
    ap.add_argument("--min-size", type=int, default=None, help="smallest object diameter in px (default: 20%% "
                                                              "of the image size)")
    ap.add_argument("--max-size", type=int, default=None, help="largest object diameter in px (default: 50%% "
                                                              "of the image size)")
    ap.add_argument("--single-min-size", type=int, default=None,
                    help="smallest object diameter in single-object images (default: --min-size)")
    ap.add_argument("--single-max-size", type=int, default=None,
                    help="largest object diameter in single-object images (default: --max-size)")
    ap.add_argument("--categories", default=",".join(DEFAULT_CATEGORIES),
                    help=f"comma list of shapes, in category-id order (available: {','.join(sorted(SHAPES))}; "
                         "default: %(default)s)")
    ap.add_argument("--novel", default=",".join(DEFAULT_NOVEL),
                    help="comma list of novel categories: no training boxes, only captions "
                         "(default: %(default)s)")
    ap.add_argument("--captions-per-image", type=int, default=2, help="default: %(default)s")
    ap.add_argument("--colour-prob", type=float, default=0.5,
                    help="fraction of captions naming colours (default: %(default)s; colour is a shortcut)")
    ap.add_argument("--single-object-prob", type=float, default=0.45,
                    help="fraction of images with exactly one object (default: %(default)s)")
    ap.add_argument("--max-rotation", type=float, default=180.0,
                    help="objects are rotated by up to this many degrees either way; 180 = any orientation "
                         "(default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    ap.add_argument("--workers", type=int, default=1, help="rendering processes; the output does not depend "
                                                           "on it (default: %(default)s)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    try:
        cfg = WorldConfig(image_size=args.image_size, categories=_names(args.categories),
                          novel=_names(args.novel), max_objects=args.max_objects, min_size=args.min_size,
                          max_size=args.max_size, single_min_size=args.single_min_size,
                          single_max_size=args.single_max_size, captions_per_image=args.captions_per_image,
                          colour_prob=args.colour_prob, single_object_prob=args.single_object_prob,
                          max_rotation=args.max_rotation, seed=args.seed)
        for name in ("num_train", "num_val", "num_test"):
            if getattr(args, name) < 0:
                raise WorldConfigError(f"--{name.replace('_', '-')} must be >= 0")
    except WorldConfigError as e:
        ap.error(str(e))
    t0 = time.time()
    world = generate_world(args.output_dir, args.num_train, args.num_val, args.num_test, config=cfg,
                           workers=args.workers, progress=not args.no_progress)
    dt = time.time() - t0
    n = sum(c["images"] for c in world["counts"].values())
    print(f"wrote {n} images of {cfg.image_size} px to {os.path.abspath(args.output_dir)} in {dt:.1f} s "
          f"({1000 * dt / max(n, 1):.2f} ms/image); world {world['fingerprint']}: "
          f"{len(world['base'])} base, {len(world['novel'])} novel ({', '.join(world['novel'])})")
    for split, c in world["counts"].items():
        print(f"  {split}: {c['images']} images, {c['annotations']} boxes"
              + (f" ({c['novel_annotations_removed']} novel boxes left out)" if split == "train" else "")
              + f", {c['captions']} captions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
