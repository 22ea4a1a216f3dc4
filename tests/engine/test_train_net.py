"""tools/train_net.py --eval-only on a small generated COCO-format data set."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_coco(root, n_images=3, seed=0):
    """Images with coloured rectangles and their COCO boxes (annotation ids from 1)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root / "images", exist_ok=True)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(["red square", "green square", "blue square"])]
    images, anns = [], []
    for i in range(n_images):
        h, w = 96, 128
        img = np.full((h, w, 3), 127, np.uint8)
        for _ in range(2):
            c = int(rng.integers(0, 3))
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            bw, bh = int(rng.integers(16, 40)), int(rng.integers(16, 40))
            img[y0:y0 + bh, x0:x0 + bw] = 0
            img[y0:y0 + bh, x0:x0 + bw, c] = 255
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1, "bbox": [x0, y0, bw, bh],
                         "area": bw * bh, "iscrowd": 0})
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w})
    with open(root / "ann.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return root / "ann.json", root / "images"


@pytest.mark.parametrize("region_type", ["GT", "RPN"])
def test_eval_only_zero_shot(tiny_clip_config, tmp_path, region_type):
    ann, images = make_coco(tmp_path)
    config = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf" + ("_GT" if region_type == "GT" else "") + ".yaml"
    out = tmp_path / "out"
    cmd = [sys.executable, "tools/train_net.py", "--eval-only", "--config-file", config,
           "--register", f"toy_val={ann}:{images}",
           "DATASETS.TEST", "('toy_val',)", "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu",
           "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config, "MODEL.CLIP.TEXT_EMB_DIM", "64",
           "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "4", "MODEL.CLIP.VOCABULARY", "",
           "MODEL.CLIP.PROMPT_TEMPLATES", "single", "INPUT.MIN_SIZE_TEST", "96",
           "MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST", "50", "DATALOADER.NUM_WORKERS", "0"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    res = json.loads((out / "inference" / "toy_val" / "results.json").read_text())
    assert set(res["bbox"]) >= {"AP", "AP50", "AP-red square"}
    assert "RANDOM weights" in r.stdout + r.stderr
    assert 0.0 <= res["bbox"]["AP50"] <= 100.0


def test_register_errors(tmp_path):
    r = subprocess.run([sys.executable, "tools/train_net.py", "--eval-only", "--config-file",
                        "configs/Base-CLIP-C4.yaml", "--register", "bad"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "NAME=ANNOTATIONS.json:IMAGE_ROOT" in r.stderr
    r = subprocess.run([sys.executable, "tools/train_net.py", "--eval-only", "--config-file",
                        "configs/Base-CLIP-C4.yaml", "--register", f"x={tmp_path}/none.json:{tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "none.json" in r.stderr and "does not exist" in r.stderr
