"""Transfer learning with tools/train_net.py on a small generated COCO-format data set:
train, checkpoint, resume, evaluate (novel / base / all), and 2 CPU processes (gloo)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import make_coco

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = ("red square", "green square", "blue square", "yellow square")
NOVEL = ("yellow square",)


def train_cmd(tmp_path, tiny_clip_config, max_iter, extra=(), num_gpus=1, resume=False):
    train_json, train_images = make_coco(tmp_path / "train", n_images=4, names=NAMES, novel=NOVEL,
                                         drop_novel_boxes=True)
    test_json, test_images = make_coco(tmp_path / "test", n_images=3, seed=1, names=NAMES, novel=NOVEL)
    cmd = [sys.executable, "tools/train_net.py", "--config-file",
           "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_ovd.yaml", "--num-gpus", str(num_gpus),
           "--register", f"toy_train={train_json}:{train_images}", "--register", f"toy_test={test_json}:{test_images}"]
    if resume:
        cmd.append("--resume")
    cmd += ["DATASETS.TRAIN", "('toy_train',)", "DATASETS.TEST", "('toy_test',)", "OUTPUT_DIR", str(tmp_path / "out"),
            "MODEL.DEVICE", "cpu", "MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config,
            "MODEL.CLIP.TEXT_EMB_DIM", "64",
            "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "4", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
            "MODEL.CLIP.VOCABULARY", "red square,green square,blue square",
            "MODEL.CLIP.OPENSET_TEST_VOCABULARY", ",".join(NAMES), "MODEL.CLIP.OPENSET_TEST_NUM_CLASSES", "4",
            "MODEL.CLIP.PROMPT_TEMPLATES", "single", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
            "MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST", "50", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
            "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96",
            "SOLVER.IMS_PER_BATCH", str(2 * num_gpus), "SOLVER.BASE_LR", "0.01", "SOLVER.MAX_ITER", str(max_iter),
            "SOLVER.STEPS", "(3,)", "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "2",
            "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0", "SEED", "1",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"] + [str(e) for e in extra]
    return cmd


def run(cmd):
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    return r.stdout + r.stderr


def test_train_checkpoint_resume_evaluate(tiny_clip_config, tmp_path):
    log = run(train_cmd(tmp_path, tiny_clip_config, max_iter=4))
    out = tmp_path / "out"
    assert (out / "model_final.pth").is_file() and (out / "model_0000001.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    ck = torch.load(out / "model_final.pth", weights_only=True)
    assert ck["iteration"] == 3
    # the RPN branch stays frozen, the CLIP backbone's res4 trains, the text encoder is frozen
    first = torch.load(out / "model_0000001.pth", weights_only=True)["model"]
    final = ck["model"]
    key = "offline_proposal_generator.rpn_head.conv.weight"
    assert torch.equal(first[key], final[key])
    assert not torch.equal(first["backbone.layer3.0.conv1.weight"], final["backbone.layer3.0.conv1.weight"])
    assert torch.equal(first["lang_encoder.text_projection"], final["lang_encoder.text_projection"])
    # the evaluation after training: novel / base / all with the right classes
    res = json.loads((out / "inference" / "toy_test" / "results.json").read_text())["bbox"]
    for key in ("AP50-novel", "AP50-base", "AP50-all", "AP-yellow square", "AP-red square"):
        assert key in res, key
    # resume: continues from the last complete checkpoint with the LR schedule restored
    log = run(train_cmd(tmp_path, tiny_clip_config, max_iter=6, resume=True, extra=["SOLVER.CHECKPOINT_KEEP_LAST", 1]))
    assert re.search(r"Starting training from iteration 4", log), log[-3000:]
    # keep-last 1: the first run's periodic checkpoints are gone, the newest and the final remain
    assert sorted(p.name for p in out.glob("model_*.pth")) == ["model_0000005.pth", "model_final.pth"]
    ck = torch.load(out / "model_final.pth", weights_only=True)
    assert ck["iteration"] == 5
    sched = ck["trainer"]["hooks"]["LRScheduler"]
    assert sched["last_epoch"] == 6  # stepped once per iteration across both runs
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    lr = [r["lr"] for r in rows if "lr" in r][-1]
    assert lr == pytest.approx(0.001)  # after the step at iteration 3: 0.01 * 0.1


def test_two_cpu_processes(tiny_clip_config, tmp_path):
    """Also: a bad training image in a 4-image data set is skipped (the floor of the bad-sample
    ceiling), and an unreadable test image seen by the second process only is left out of the
    end-of-training evaluation and reported by the main process."""
    cmd = train_cmd(tmp_path, tiny_clip_config, max_iter=2, num_gpus=2, extra=["SOLVER.CHECKPOINT_PERIOD", "100"])
    (tmp_path / "train" / "images" / "0.png").write_bytes(b"not an image")
    data = (tmp_path / "test" / "images" / "2.png").read_bytes()  # the second process's shard: image 3 of 3
    (tmp_path / "test" / "images" / "2.png").write_bytes(data[: len(data) // 2])
    log = run(cmd)
    assert (tmp_path / "out" / "model_final.pth").is_file()
    assert "world size: 2" in log.lower() or "Rank of current process: 0. World size: 2" in log
    assert "skipping bad training sample" in log and "0.png" in log
    res = json.loads((tmp_path / "out" / "inference" / "toy_test" / "results.json").read_text())
    assert res["images"] == {"total": 3, "evaluated": 2, "unreadable": 1}
    assert [x["file_name"].rsplit("/", 1)[1] for x in res["unreadable_images"]] == ["2.png"]
    assert "1 of 3 images could not be read and are excluded" in log


def test_unseeded_run_saves_its_seed_and_resumes_exactly(tiny_clip_config, tmp_path):
    """SEED -1: the generated seed is saved in the checkpoint; the run interrupted and resumed
    equals an uninterrupted run given that seed (same initial weights; weights compared exactly)."""
    run(train_cmd(tmp_path / "init", tiny_clip_config, max_iter=1))  # a fixed starting point
    init = str(tmp_path / "init" / "out" / "model_final.pth")
    cut = tmp_path / "cut"
    run(train_cmd(cut, tiny_clip_config, max_iter=2, extra=["SEED", -1, "MODEL.WEIGHTS", init]))
    seed = torch.load(cut / "out" / "model_final.pth", weights_only=True)["trainer"]["seed"]
    assert isinstance(seed, int) and seed >= 0
    run(train_cmd(cut, tiny_clip_config, max_iter=4, resume=True, extra=["SEED", -1, "MODEL.WEIGHTS", init]))
    ref = tmp_path / "ref"
    run(train_cmd(ref, tiny_clip_config, max_iter=4, extra=["SEED", seed, "MODEL.WEIGHTS", init]))
    a = torch.load(cut / "out" / "model_final.pth", weights_only=True)
    b = torch.load(ref / "out" / "model_final.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 3
    diff = [k for k in b["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not diff, diff[:5]
