"""Crash-safe training, for real: a transfer-learning run is killed with SIGKILL after a step,
half way through a checkpoint write, and between the checkpoint file and ``last_checkpoint``;
each time ``--resume`` continues from the last complete checkpoint, and the final weights,
optimizer and scheduler state equal those of an uninterrupted run (CPU, same seed)."""
import os
import re
import subprocess
import sys

import torch
from helpers import make_coco

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = ("red square", "green square", "blue square")


def _cmd(tmp_path, tiny_clip_config, out, workers, resume=False):
    data = []
    for part, size in (("land", (96, 128)), ("port", (128, 96))):  # both orientations: grouping is exercised
        ann, images = make_coco(tmp_path / part, n_images=3, seed=len(part) + size[0], names=NAMES, size=size)
        data += ["--register", f"crash_{part}={ann}:{images}"]
    return (data + (["--resume"] if resume else []) + [
        "--config-file", "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_ovd.yaml",
        "DATASETS.TRAIN", "('crash_land','crash_port')", "DATASETS.TEST", "()", "OUTPUT_DIR", str(out),
        "MODEL.DEVICE", "cpu", "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config, "MODEL.CLIP.TEXT_EMB_DIM", "64",
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "4", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
        "MODEL.CLIP.VOCABULARY", ",".join(NAMES), "MODEL.CLIP.PROMPT_TEMPLATES", "single",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
        "INPUT.MIN_SIZE_TRAIN", "(80, 96)", "INPUT.MAX_SIZE_TRAIN", "128", "DATALOADER.ASPECT_RATIO_GROUPING", "True",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.01", "SOLVER.MOMENTUM", "0.9", "SOLVER.MAX_ITER", "8",
        "SOLVER.STEPS", "(5,)", "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
        "DATALOADER.NUM_WORKERS", str(workers), "SEED", "3"])


def _run(args, crash=None):
    prefix = [sys.executable, "tests/engine/crash_driver.py", *crash] if crash else [sys.executable,
                                                                                      "tools/train_net.py"]
    r = subprocess.run(prefix + args, cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return r.returncode, r.stdout + r.stderr


def _last(out):
    return (out / "last_checkpoint").read_text().strip()


def test_sigkill_at_several_points_then_resume_equals_uninterrupted(tiny_clip_config, tmp_path):
    ref_out, out = tmp_path / "ref", tmp_path / "crashed"
    rc, log = _run(_cmd(tmp_path, tiny_clip_config, ref_out, workers=0))
    assert rc == 0, log[-4000:]

    # 1. killed right after the step of iteration 4: checkpoints of iterations 1 and 3 exist
    rc, log = _run(_cmd(tmp_path, tiny_clip_config, out, workers=2), crash=("step", "4"))
    assert rc == -9, log[-3000:]
    assert _last(out) == "model_0000003.pth" and not (out / "model_0000005.pth").exists()

    # 2. resumed at 4, killed half way through writing model_0000005.pth
    rc, log = _run(_cmd(tmp_path, tiny_clip_config, out, workers=2, resume=True), crash=("save", "1"))
    assert rc == -9 and "Starting training from iteration 4" in log, log[-3000:]
    assert _last(out) == "model_0000003.pth" and not (out / "model_0000005.pth").exists()
    partial = [p for p in os.listdir(out) if ".tmp." in p]
    assert partial and partial[0].startswith("model_0000005.pth.tmp.")

    # 3. resumed at 4 again, killed after model_0000005.pth is complete but before last_checkpoint names it
    rc, log = _run(_cmd(tmp_path, tiny_clip_config, out, workers=2, resume=True), crash=("tag", "1"))
    assert rc == -9 and "Starting training from iteration 4" in log, log[-3000:]
    assert _last(out) == "model_0000003.pth" and (out / "model_0000005.pth").is_file()
    assert not [p for p in os.listdir(out) if ".tmp." in p]  # the stale partial file was removed
    assert re.search(r"removed \S+model_0000005.pth.tmp.\d+, the partial file of an interrupted", log)

    # 4. resumed at 4 once more, runs to the end
    rc, log = _run(_cmd(tmp_path, tiny_clip_config, out, workers=2, resume=True))
    assert rc == 0 and "Starting training from iteration 4" in log, log[-3000:]

    ref = torch.load(ref_out / "model_final.pth", weights_only=True)
    got = torch.load(out / "model_final.pth", weights_only=True)
    assert ref["iteration"] == got["iteration"] == 7
    assert ref["model"].keys() == got["model"].keys()
    diff = [k for k in ref["model"] if not torch.equal(ref["model"][k], got["model"][k])]
    assert not diff, diff[:5]
    ref_opt, got_opt = ref["trainer"]["_trainer"]["optimizer"], got["trainer"]["_trainer"]["optimizer"]
    assert ref_opt["param_groups"] == got_opt["param_groups"] and len(ref_opt["state"]) > 10
    for k, state in ref_opt["state"].items():
        assert torch.equal(state["momentum_buffer"], got_opt["state"][k]["momentum_buffer"]), k
    assert ref["trainer"]["hooks"]["LRScheduler"] == got["trainer"]["hooks"]["LRScheduler"]
    assert ref["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 8
    # something did train: the weights moved away from the iteration-1 checkpoint
    first = torch.load(out / "model_0000001.pth", weights_only=True)["model"]
    assert not torch.equal(first["backbone.layer3.0.conv1.weight"], got["model"]["backbone.layer3.0.conv1.weight"])
