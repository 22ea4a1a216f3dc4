"""The library works installed, without the repository: configs ship inside the package and
nothing in it looks for the checkout (a wheel installed into a fresh folder, run elsewhere)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r"""
import os, sys, torch
import regionclip_d2
from regionclip_d2 import get_regionclip_cfg
from detectron2.modeling import build_model
assert regionclip_d2.__file__.startswith(sys.argv[1]), regionclip_d2.__file__
# a repo-style config path whose yaml names another config (the RPN branch) by a repo-style path
cfg = get_regionclip_cfg("configs/synthetic/CLIP_fast_rcnn_world_ovd.yaml",
                         ["MODEL.CLIP.OPENCLIP_MODEL_CONFIG", sys.argv[2], "MODEL.CLIP.TEXT_EMB_DIM", 64,
                          "MODEL.CLIP.VOCABULARY", "", "MODEL.DEVICE", "cpu"])
torch.manual_seed(0)
model = build_model(cfg).eval()
print("ok", type(model).__name__, os.getcwd())
"""


def test_wheel_installed_elsewhere_builds_a_detector_from_a_config_path(tmp_path, tiny_clip_config):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ROOT,
                        "-w", str(wheels)], capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = wheels.glob("regionclip_d2-*.whl")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (target / "regionclip_d2" / "model_zoo" / "configs" / "synthetic" / "rpn_R_18_FPN_world.yaml").is_file()
    env = dict(os.environ, PYTHONPATH=str(target), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(target), tiny_clip_config], capture_output=True,
                       text=True, cwd=str(elsewhere), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ok CLIPFastRCNN" in r.stdout
