"""Region-text pretraining through tools/train_net.py: concept pool file, caption data,
gradient clipping, periodic checkpoints, and --resume after a SIGKILL giving the same
weights as an uninterrupted run (caption files carry no image sizes: orientation grouping
is replayed from the image headers)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAPTIONS = ["a red star", "two blue rings", "a green moon", "a heart", "three small boxes", "a yellow sun",
            "a grey cat", "an old boat"]


def _write_data(tmp_path):
    """Caption data without sizes: landscape and portrait images, an image that is not an
    image at all, and one whose header is intact but whose data is cut short (its size is
    known, decoding fails: it is replaced by the next image, of the other orientation)."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    with open(tmp_path / "captions.jsonl", "w") as f:
        for i, caption in enumerate(CAPTIONS):
            shape = (72, 96, 3) if i % 3 else (96, 72, 3)  # 0, 3, 6 portrait
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(images / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "caption": caption}) + "\n")
        f.write(json.dumps({"file_name": "broken.png", "caption": "a broken image"}) + "\n")
        f.write(json.dumps({"file_name": "truncated.png", "caption": "a cut image"}) + "\n")
        f.write(json.dumps({"file_name": "last.png", "caption": "the last image"}) + "\n")
    (images / "broken.png").write_bytes(b"\x89PNG broken")
    buf = images / "truncated.png"
    Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(buf)  # landscape header
    buf.write_bytes(buf.read_bytes()[:200])
    Image.fromarray(rng.integers(0, 255, (96, 72, 3), dtype=np.uint8)).save(images / "last.png")  # portrait
    return images


def test_pretrain_with_train_net_and_exact_resume(tiny_clip, tiny_clip_config, tmp_path):
    images = _write_data(tmp_path)
    torch.save(torch.nn.functional.normalize(torch.randn(10, 64), dim=-1), tmp_path / "concepts.pth")
    torch.save(tiny_clip.state_dict(), tmp_path / "clip.pth")

    def run(out, workers, resume=False, crash=None):
        prefix = ["tests/engine/crash_driver.py", *crash] if crash else ["tools/train_net.py"]
        args = ([sys.executable, *prefix, "--config-file", "configs/pretrain/RegionCLIP_RN50.yaml",
                 "--register-captions", f"toy_captions={tmp_path / 'captions.jsonl'}:{images}"]
                + (["--resume"] if resume else [])
                + ["DATASETS.TRAIN", "('toy_captions',)", "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu",
                   "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config, "MODEL.CLIP.TEXT_EMB_DIM", "64",
                   "MODEL.CLIP.CLIP_WEIGHTS", str(tmp_path / "clip.pth"),
                   "MODEL.CLIP.CONCEPT_POOL_EMB", str(tmp_path / "concepts.pth"),
                   "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "4", "MODEL.CLIP.TEACHER_POOLER_RESOLUTION", "4",
                   "MODEL.CLIP.CROP_REGION_TYPE", "RPN", "MODEL.CLIP.PRETRAIN_RPN_REGIONS", "20",
                   "MODEL.CLIP.OFFLINE_RPN_CONFIG", "configs/synthetic/rpn_R_18_FPN_world.yaml",  # a small RPN
                   "MODEL.CLIP.PRETRAIN_SAMPLE_REGIONS", "8", "MODEL.CLIP.GATHER_GPUS", "False",
                   "INPUT.MIN_SIZE_TRAIN", "(48, 64)", "INPUT.MAX_SIZE_TRAIN", "96",
                   "DATALOADER.ASPECT_RATIO_GROUPING", "True",
                   "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.0005", "SOLVER.MAX_ITER", "6",
                   "SOLVER.STEPS", "(4,)", "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
                   "DATALOADER.NUM_WORKERS", str(workers), "SEED", "7",
                   "DATALOADER.MAX_BAD_SAMPLE_FRACTION", "0.5"])  # 2 of 11 images are bad
        r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        return r.returncode, r.stdout + r.stderr

    ref_out, out = tmp_path / "ref", tmp_path / "crashed"
    rc, log = run(ref_out, workers=0)
    assert rc == 0, log[-4000:]
    assert re.search(r"skipping bad training sample \S*broken.png", log)
    assert re.search(r"skipping bad training sample \S*truncated.png", log)
    rows = [json.loads(line) for line in (ref_out / "metrics.json").read_text().splitlines()]
    assert all(k in rows[-1] for k in ("loss_region_contrastive", "loss_region_distillation", "loss_image_text"))
    ref = torch.load(ref_out / "model_final.pth", weights_only=True)
    sd = ref["model"]
    assert any(k.startswith("teacher_backbone.") for k in sd) and ref["iteration"] == 5
    # the teacher did not move; the student did
    clip = tiny_clip.state_dict()
    assert torch.equal(sd["teacher_backbone.layer3.0.conv1.weight"], clip["visual.layer3.0.conv1.weight"])
    assert not torch.equal(sd["backbone.layer3.0.conv1.weight"], clip["visual.layer3.0.conv1.weight"])

    # killed right after the step of iteration 4 (2 loader workers): checkpoints of 1 and 3 exist.
    # With SEED 7 the first 4 batches take stream positions 0..8 (not 0..7: a sample is still
    # waiting in its orientation buffer at the resume), which hold both bad images, each
    # replaced by last.png (a portrait) in the landscape buffer of its own header: a restart
    # at sample 8, or a replay by the replacement's orientation, gives other batches
    rc, log = run(out, workers=2, crash=("step", "4"))
    assert rc == -9, log[-3000:]
    assert (out / "last_checkpoint").read_text().strip() == "model_0000003.pth"
    rc, log = run(out, workers=2, resume=True)
    assert rc == 0 and "Starting training from iteration 4" in log, log[-4000:]
    assert "not exactly where it stopped" not in log
    assert re.search(r"replayed the orientation grouping of 4 batches \(9 samples; 9 image headers read\)", log)

    got = torch.load(out / "model_final.pth", weights_only=True)
    assert got["iteration"] == 5 and got["model"].keys() == sd.keys()
    diff = [k for k in sd if not torch.equal(sd[k], got["model"][k])]
    assert not diff, diff[:5]
    ref_opt, got_opt = ref["trainer"]["_trainer"]["optimizer"], got["trainer"]["_trainer"]["optimizer"]
    assert ref_opt["param_groups"] == got_opt["param_groups"] and len(ref_opt["state"]) > 10
    for k, state in ref_opt["state"].items():
        for name, value in state.items():
            assert torch.equal(value, got_opt["state"][k][name]), (k, name)
    assert ref["trainer"]["hooks"]["LRScheduler"] == got["trainer"]["hooks"]["LRScheduler"]
