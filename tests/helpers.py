"""Shared builders for the tests: tiny configs and models, built in-process."""
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from regionclip_d2 import get_regionclip_cfg


def tiny_cfg(config_file, tiny_clip_config, vocabulary="cat,dog,ring", extra=()):
    """A repository config made tiny: the tiny CLIP, 4x4 RoIs (C4), a small vocabulary."""
    cfg = get_regionclip_cfg(config_file)
    opts = ["MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config, "MODEL.CLIP.TEXT_EMB_DIM", 64,
            "MODEL.DEVICE", "cpu", "MODEL.CLIP.PROMPT_TEMPLATES", "single"]
    if vocabulary is not None:
        n = len(vocabulary.split(","))
        opts += ["MODEL.CLIP.VOCABULARY", vocabulary, "MODEL.ROI_HEADS.NUM_CLASSES", n]
        if cfg.MODEL.CLIP.OPENSET_TEST_NUM_CLASSES:
            opts += ["MODEL.CLIP.OPENSET_TEST_NUM_CLASSES", 0, "MODEL.CLIP.OPENSET_TEST_VOCABULARY", ""]
    if cfg.MODEL.ROI_HEADS.NAME == "CLIPRes5ROIHeads":
        opts += ["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 4]
    opts += list(extra)
    cfg.merge_from_list([str(o) for o in opts])
    return cfg


def tiny_model(*args, **kwargs):
    torch.manual_seed(0)
    return build_model(tiny_cfg(*args, **kwargs)).eval()


def image_input(h=96, w=128, boxes=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), "height": h, "width": w}
    if boxes is not None:
        d["instances"] = Instances((h, w), gt_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)),
                                   gt_classes=torch.zeros(len(boxes), dtype=torch.long))
    return d


def make_coco(root, n_images=3, seed=0, names=("red square", "green square", "blue square"), novel=(),
              drop_novel_boxes=False, size=(96, 128)):
    """Write images with coloured rectangles and their COCO file (annotation ids from 1).

    Categories in ``novel`` are marked ``"split": "novel"``; with ``drop_novel_boxes`` their
    boxes are left out (a training split). Returns (json path, image folder)."""
    import json
    import os

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(root / "images", exist_ok=True)
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    cats = [{"id": i + 1, "name": n, "split": "novel" if n in novel else "base"} for i, n in enumerate(names)]
    images, anns = [], []
    h, w = size
    for i in range(n_images):
        img = np.full((h, w, 3), 127, np.uint8)
        for _ in range(2):
            c = int(rng.integers(0, len(names)))
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            bw, bh = int(rng.integers(16, 40)), int(rng.integers(16, 40))
            img[y0:y0 + bh, x0:x0 + bw] = palette[c % len(palette)]
            if drop_novel_boxes and names[c] in novel:
                continue
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1, "bbox": [x0, y0, bw, bh],
                         "area": bw * bh, "iscrowd": 0})
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w})
    path = root / "ann.json"
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return path, root / "images"


def exif_rotated_copy(images, ann, index):
    """Replace image ``index`` of a COCO file by a JPEG of the same stored pixels tagged EXIF
    orientation 6 ("turn 90 degrees clockwise to view"); the annotation keeps the stored size,
    as COCO's own files do. Returns the new file name."""
    import json

    from PIL import Image

    data = json.loads(ann.read_text())
    im = data["images"][index]
    pixels = Image.open(images / im["file_name"]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    name = im["file_name"].rsplit(".", 1)[0] + "_exif.jpg"
    pixels.save(images / name, quality=95, exif=exif.tobytes())
    im["file_name"] = name
    ann.write_text(json.dumps(data))
    return name
