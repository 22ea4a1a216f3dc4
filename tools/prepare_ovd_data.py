#!/usr/bin/env python
"""Build the open-vocabulary detection splits from COCO 2017 and LVIS v1 annotations.

COCO (OVR-CNN split; 48 base, 17 novel classes):
  <coco-dir>/annotations/ovd_ins_train2017_b.json    train2017, base classes only  (coco_2017_ovd_b_train)
  <coco-dir>/annotations/ovd_ins_val2017_all.json    val2017, 65 classes           (coco_2017_ovd_all_test)
  <coco-dir>/annotations/ovd_ins_val2017_t.json      val2017, 17 novel classes     (coco_2017_ovd_t_test)
Each category carries "split": "base" | "novel". Crowd annotations are kept (ignored by
training and evaluation as usual); images without any annotation of the split's classes
are dropped from the training file.

LVIS (866 base = frequent + common; rare = novel):
  <lvis-dir>/lvis_v1_train_base.json                 lvis_v1_train without rare annotations (lvis_v1_train_base)

  python tools/prepare_ovd_data.py --coco-dir datasets/coco --lvis-dir datasets/lvis
"""
import argparse
import json
import os
import sys

from tqdm import tqdm


def _load(path, what):
    if not os.path.isfile(path):
        raise SystemExit(f"prepare_ovd_data: {what} {path} does not exist. Download it (datasets/README.md) "
                         "or point --coco-dir / --lvis-dir at the folder that holds it.")
    print(f"reading {path}")
    with open(path) as f:
        return json.load(f)


def coco_split(data, keep_names, novel_names, drop_empty_images):
    """A COCO dict restricted to the categories ``keep_names`` (marked base/novel)."""
    name_of = {c["id"]: c["name"] for c in data["categories"]}
    missing = sorted(set(keep_names) - set(name_of.values()))
    if missing:
        raise SystemExit(f"prepare_ovd_data: categories {missing} are not in the COCO file")
    keep_ids = {i for i, n in name_of.items() if n in set(keep_names)}
    cats = [dict(c, split="novel" if c["name"] in novel_names else "base")
            for c in data["categories"] if c["id"] in keep_ids]
    anns = [a for a in tqdm(data["annotations"], desc="annotations", unit="ann", leave=False)
            if a["category_id"] in keep_ids]
    images = data["images"]
    if drop_empty_images:
        used = {a["image_id"] for a in anns if not a.get("iscrowd", 0)}
        images = [im for im in images if im["id"] in used]
    out = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
    out.update(images=images, annotations=anns, categories=cats)
    return out


def write(data, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
    print(f"wrote {path}: {len(data['images'])} images, {len(data['annotations'])} annotations, "
          f"{len(data['categories'])} categories")


def prepare_coco(coco_dir):
    from regionclip_d2.data.vocabularies import COCO_OVD_BASE, COCO_OVD_NOVEL

    ann_dir = os.path.join(coco_dir, "annotations")
    train = _load(os.path.join(ann_dir, "instances_train2017.json"), "COCO annotation file")
    write(coco_split(train, COCO_OVD_BASE, COCO_OVD_NOVEL, True), os.path.join(ann_dir, "ovd_ins_train2017_b.json"))
    val = _load(os.path.join(ann_dir, "instances_val2017.json"), "COCO annotation file")
    write(coco_split(val, COCO_OVD_BASE + COCO_OVD_NOVEL, COCO_OVD_NOVEL, False),
          os.path.join(ann_dir, "ovd_ins_val2017_all.json"))
    write(coco_split(val, COCO_OVD_NOVEL, COCO_OVD_NOVEL, False), os.path.join(ann_dir, "ovd_ins_val2017_t.json"))


def lvis_base(data):
    """LVIS without rare-class annotations; every category kept (LVIS ids stay contiguous)."""
    rare = {c["id"] for c in data["categories"] if c.get("frequency") == "r"}
    if not rare:
        raise SystemExit("prepare_ovd_data: the LVIS file marks no category as rare (frequency 'r')")
    out = dict(data)
    out["annotations"] = [a for a in data["annotations"] if a["category_id"] not in rare]
    return out


def prepare_lvis(lvis_dir):
    data = _load(os.path.join(lvis_dir, "lvis_v1_train.json"), "LVIS annotation file")
    write(lvis_base(data), os.path.join(lvis_dir, "lvis_v1_train_base.json"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coco-dir", default="", help="folder with annotations/instances_{train,val}2017.json")
    ap.add_argument("--lvis-dir", default="", help="folder with lvis_v1_train.json")
    args = ap.parse_args(argv)
    if not args.coco_dir and not args.lvis_dir:
        ap.error("give --coco-dir and/or --lvis-dir")
    if args.coco_dir:
        prepare_coco(args.coco_dir)
    if args.lvis_dir:
        prepare_lvis(args.lvis_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
