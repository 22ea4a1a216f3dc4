"""tools/train_net.py --eval-only on a small generated COCO-format data set."""
import json
import os
import subprocess
import sys

import pytest
from helpers import exif_rotated_copy, make_coco

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("region_type", ["GT", "RPN"])
def test_eval_only_zero_shot(tiny_clip_config, tmp_path, region_type):
    ann, images = make_coco(tmp_path)
    suffix = "_GT" if region_type == "GT" else ""
    config = f"configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf{suffix}.yaml"
    out = tmp_path / "out"
    cmd = [sys.executable, "tools/train_net.py", "--eval-only", "--config-file", config,
           "--register", f"toy_val={ann}:{images}",
           "DATASETS.TEST", "('toy_val',)", "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu",
           "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config, "MODEL.CLIP.TEXT_EMB_DIM", "64",
           "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "4", "MODEL.CLIP.VOCABULARY", "",
           "MODEL.CLIP.PROMPT_TEMPLATES", "single", "INPUT.MIN_SIZE_TEST", "96",
           "MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST", "50", "DATALOADER.NUM_WORKERS", "0",
           # a random model may put every class below the default threshold; per-class AP needs detections
           "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    res = json.loads((out / "inference" / "toy_val" / "results.json").read_text())
    assert set(res["bbox"]) >= {"AP", "AP50", "AP-red square"}
    assert "RANDOM weights" in r.stdout + r.stderr
    assert 0.0 <= res["bbox"]["AP50"] <= 100.0


def test_eval_only_survives_a_truncated_and_an_exif_rotated_image(tiny_clip_config, tmp_path):
    """A truncated image is left out (logged, counted in results.json); an EXIF-rotated JPEG
    annotated at its stored size is read (detectron2 alone raised SizeMismatchError on it)."""
    ann, images = make_coco(tmp_path, n_images=4)
    exif_name = exif_rotated_copy(images, ann, 3)
    data = (images / "1.png").read_bytes()
    (images / "1.png").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    cmd = [sys.executable, "tools/train_net.py", "--eval-only", "--config-file",
           "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml", "--register",
           f"toy_val={ann}:{images}", "DATASETS.TEST", "('toy_val',)", "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu",
           "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config, "MODEL.CLIP.TEXT_EMB_DIM", "64",
           "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "4", "MODEL.CLIP.VOCABULARY", "",
           "MODEL.CLIP.PROMPT_TEMPLATES", "single", "INPUT.MIN_SIZE_TEST", "96", "DATALOADER.NUM_WORKERS", "0",
           "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    res = json.loads((out / "inference" / "toy_val" / "results.json").read_text())
    assert res["images"] == {"total": 4, "evaluated": 3, "unreadable": 1}
    assert [x["file_name"].rsplit("/", 1)[1] for x in res["unreadable_images"]] == ["1.png"]
    assert 0.0 <= res["bbox"]["AP50"] <= 100.0
    assert "CANNOT READ IMAGE" in log and "1 of 4 images could not be read and are excluded" in log
    assert "AP is over the 3 images read" in log
    assert exif_name not in json.dumps(res["unreadable_images"])


def test_register_errors(tmp_path):
    r = subprocess.run([sys.executable, "tools/train_net.py", "--eval-only", "--config-file",
                        "configs/Base-CLIP-C4.yaml", "--register", "bad"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "NAME=ANNOTATIONS.json:IMAGE_ROOT" in r.stderr
    r = subprocess.run([sys.executable, "tools/train_net.py", "--eval-only", "--config-file",
                        "configs/Base-CLIP-C4.yaml", "--register", f"x={tmp_path}/none.json:{tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "none.json" in r.stderr and "does not exist" in r.stderr
