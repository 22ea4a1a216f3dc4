"""Region-text pretraining through tools/train_net.py: concept pool file, caption data,
gradient clipping, periodic checkpoints, --resume."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_pretrain_with_train_net(tiny_clip, tiny_clip_config, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    with open(tmp_path / "captions.jsonl", "w") as f:
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(images / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "caption": ["a red star", "two blue rings",
                                                                     "a green moon", "a heart"][i]}) + "\n")
    (images / "broken.png").write_bytes(b"\x89PNG broken")
    with open(tmp_path / "captions.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "broken.png", "caption": "a broken image"}) + "\n")
    torch.save(torch.nn.functional.normalize(torch.randn(10, 64), dim=-1), tmp_path / "concepts.pth")
    torch.save(tiny_clip.state_dict(), tmp_path / "clip.pth")
    out = tmp_path / "out"

    def cmd(max_iter, resume=False):
        return ([sys.executable, "tools/train_net.py", "--config-file", "configs/pretrain/RegionCLIP_RN50.yaml",
                 "--register-captions", f"toy_captions={tmp_path / 'captions.jsonl'}:{images}"]
                + (["--resume"] if resume else [])
                + ["DATASETS.TRAIN", "('toy_captions',)", "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu",
                   "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config, "MODEL.CLIP.TEXT_EMB_DIM", "64",
                   "MODEL.CLIP.CLIP_WEIGHTS", str(tmp_path / "clip.pth"),
                   "MODEL.CLIP.CONCEPT_POOL_EMB", str(tmp_path / "concepts.pth"),
                   "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "4", "MODEL.CLIP.TEACHER_POOLER_RESOLUTION", "4",
                   "MODEL.CLIP.CROP_REGION_TYPE", "RPN", "MODEL.CLIP.PRETRAIN_RPN_REGIONS", "20",
                   "MODEL.CLIP.PRETRAIN_SAMPLE_REGIONS", "8", "MODEL.CLIP.GATHER_GPUS", "False",
                   "INPUT.MIN_SIZE_TRAIN", "(72,)", "INPUT.MAX_SIZE_TRAIN", "96",
                   "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.0005", "SOLVER.MAX_ITER", str(max_iter),
                   "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "2",
                   "DATALOADER.NUM_WORKERS", "0", "SEED", "0",
                   "DATALOADER.MAX_BAD_SAMPLE_FRACTION", "0.5"])  # 1 of 5 images is broken

    r = subprocess.run(cmd(3), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert re.search(r"skipping bad training sample \S*broken.png", r.stdout + r.stderr)
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert all(k in rows[-1] for k in ("loss_region_contrastive", "loss_region_distillation", "loss_image_text"))
    ck = torch.load(out / "model_final.pth", weights_only=True)
    sd = ck["model"]
    assert any(k.startswith("teacher_backbone.") for k in sd) and ck["iteration"] == 2
    # the teacher did not move; the student did
    ref = tiny_clip.state_dict()
    assert torch.equal(sd["teacher_backbone.layer3.0.conv1.weight"], ref["visual.layer3.0.conv1.weight"])
    assert not torch.equal(sd["backbone.layer3.0.conv1.weight"], ref["visual.layer3.0.conv1.weight"])
    r = subprocess.run(cmd(5, resume=True), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "Starting training from iteration 3" in r.stdout + r.stderr
    assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == 4
