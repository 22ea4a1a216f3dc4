"""CLIPSelf through tools/train_net.py on caption data (captions ignored) and on detection data
(annotations ignored): AdamW steps, the loss logged, the teacher equal to the CLIP file, the
student moved."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_VIT
from helpers import make_coco
from PIL import Image

from regionclip_d2.modeling.clip_model import build_clip_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _caption_data(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    with open(tmp_path / "captions.jsonl", "w") as f:
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "caption": f"picture {i}"}) + "\n")
    return ["--register-captions", f"toy_images={tmp_path / 'captions.jsonl'}:{images}"]


def _detection_data(tmp_path):
    ann, images = make_coco(tmp_path, n_images=4, size=(48, 64))
    return ["--register", f"toy_images={ann}:{images}"]


@pytest.mark.parametrize("data", [_caption_data, _detection_data], ids=["captions", "detection"])
def test_clipself_with_train_net(tiny_vit_config, tmp_path, data):
    torch.manual_seed(0)
    clip_file = tmp_path / "vit.pth"
    torch.save(build_clip_from_config(TINY_VIT).state_dict(), clip_file)
    out = tmp_path / "out"
    args = [sys.executable, "tools/train_net.py", "--config-file", "configs/clipself/CLIPSelf_ViT-B-16.yaml",
            *data(tmp_path), "DATASETS.TRAIN", "('toy_images',)", "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu",
            "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_vit_config, "MODEL.CLIP.CLIP_WEIGHTS", str(clip_file),
            "INPUT.MIN_SIZE_TRAIN", "(48,)", "INPUT.MAX_SIZE_TRAIN", "64", "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.BASE_LR", "0.001", "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1",
            "SOLVER.CHECKPOINT_PERIOD", "100", "DATALOADER.NUM_WORKERS", "0", "SEED", "3"]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    # detectron2 logs a single loss term as total_loss only
    assert rows[-1]["iteration"] == 2 and 0 < rows[-1]["total_loss"] < 2
    sd = torch.load(out / "model_final.pth", weights_only=True)["model"]
    clip = torch.load(clip_file, weights_only=True)
    for k, v in clip.items():
        if k.startswith("visual."):
            assert torch.equal(sd["teacher_backbone." + k[len("visual."):]], v), k  # the teacher did not move
    assert not torch.equal(sd["backbone.proj"], clip["visual.proj"])  # the student did
