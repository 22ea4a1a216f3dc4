"""tools/app.py: its help, option checks, the synthetic demo's settings (the same overrides the
pipeline's demo stage gives tools/demo.py), and the command serving the page with the tiny model."""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from tiny_app import free_port, tiny_clip_json

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "app.py")


def load_tool():
    spec = importlib.util.spec_from_file_location("tools_app", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tool_env(**extra):
    """The environment of a tool run: this checkout's package first (not another installed copy)."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", PYTHONPATH=path, **extra)


def run(args, **kw):
    env = tool_env()
    return subprocess.run([sys.executable, TOOL] + args, cwd=ROOT, capture_output=True, text=True, env=env, **kw)


def test_help_and_option_checks():
    r = run(["--help"])
    assert r.returncode == 0
    for text in ("--config-file", "--weights", "--rpn-weights", "--synthetic", "--port", "--opts", "RANDOM weights"):
        assert text in r.stdout
    r = run(["--synthetic", "output/synthetic_demo", "--weights", "w.pth"])
    assert r.returncode == 2 and "--synthetic picks the run's own config and weights" in r.stderr
    r = run(["--threshold", "3"])
    assert r.returncode == 2 and "--threshold 3.0: give a number from 0 to 1" in r.stderr


def test_a_taken_port_is_named_before_the_model_is_built():
    tool = load_tool()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port} .*pass --port {port + 1}"):
            tool.check_port("127.0.0.1", port)


def fake_run(root, moved_from="/elsewhere/synthetic_demo"):
    """The files of a finished synthetic demo run that the app reads (weights as empty files),
    with results.json written where the run used to be (``moved_from``)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from synthetic_pipeline import PROFILES

    profile = PROFILES["demo"]
    for sub in ("transfer/regionclip_fpn", "rpn", "world_clip", "world/test"):
        os.makedirs(root / sub, exist_ok=True)
    for f in ("transfer/regionclip_fpn/model_final.pth", "rpn/model_final.pth", "world_clip/world_clip.pt",
              "world_clip/world_clip.json", "world/test/test_000000.png", "world/test/test_000001.png"):
        (root / f).write_bytes(b"")
    novel = profile["novel"].split(",")
    cats = [{"id": i + 1, "name": n, "split": "novel" if n in novel else "base"}
            for i, n in enumerate(profile["categories"].split(","))]
    (root / "world" / "world.json").write_text(json.dumps({"categories": cats}))
    os.makedirs(root / "world" / "annotations", exist_ok=True)  # the demo stage picks its images by ground truth
    (root / "world" / "annotations" / "instances_test.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "test_000000.png"}, {"id": 2, "file_name": "test_000001.png"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": len(cats)}], "categories": cats}))
    (root / "results.json").write_text(json.dumps({
        "profile": profile, "seed": 0, "demo_detector": "RegionCLIP student",
        "transfer": {"RegionCLIP student": {"weights": f"{moved_from}/transfer/regionclip_fpn/model_final.pth"}}}))
    return profile


def test_synthetic_settings_are_the_pipelines_demo_overrides(tmp_path, monkeypatch):
    tool = load_tool()
    run_dir = tmp_path / "run"
    profile = fake_run(run_dir)
    s = tool.synthetic_settings(str(run_dir))
    # what the pipeline's demo stage gives tools/demo.py for the same run
    from synthetic_pipeline import Pipeline

    calls = []
    monkeypatch.setattr(Pipeline, "tool", lambda self, name, args, stage, log_name=None: calls.append(args))
    weights = str(run_dir / "transfer" / "regionclip_fpn" / "model_final.pth")
    Pipeline(str(run_dir), overrides=profile).demo(weights, "FPN")
    demo_args = [str(a) for a in calls[0]]
    assert s["opts"] == demo_args[demo_args.index("--opts") + 1:]
    assert s["config"] == os.path.join(ROOT, demo_args[demo_args.index("--config-file") + 1])
    assert s["vocabulary"].split(", ") == demo_args[demo_args.index("--custom-vocabulary") + 1].split(",")
    assert s["threshold"] == float(demo_args[demo_args.index("--confidence-threshold") + 1]) == 0.5
    assert s["world_test"] == str(run_dir / "world" / "test")
    # the run was moved: its weights are found under the folder given
    assert s["opts"][:2] == ["MODEL.WEIGHTS", weights]
    with pytest.raises(SystemExit, match="results.json not found: run `make demo` first"):
        tool.synthetic_settings(str(tmp_path / "nothing"))
    os.remove(run_dir / "rpn" / "model_final.pth")
    with pytest.raises(SystemExit, match="rpn/model_final.pth is missing: the run is incomplete"):
        tool.synthetic_settings(str(run_dir))


def test_the_command_serves_the_page_with_random_weights(tmp_path):
    """tools/app.py on the tiny CLIP with no weights: the page has the banner, a request works."""
    import httpx

    port = free_port()
    opts = ["MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_json(tmp_path), "MODEL.CLIP.TEXT_EMB_DIM", "64",
            "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "4", "MODEL.CLIP.PROMPT_TEMPLATES", "single",
            "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128",
            "MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST", "20"]
    env = tool_env(OMP_NUM_THREADS="1")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, TOOL, "--port", str(port), "--cpu", "--opts"] + opts, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url, page = f"http://127.0.0.1:{port}", None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                page = httpx.get(url + "/", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert page is not None, f"the server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}"
        assert page.status_code == 200 and 'id="random-banner"' in page.text
        info = httpx.get(url + "/api/info").json()
        assert info["defaults"]["sample"] == "chelsea.png" and "chelsea.png" in info["samples"]
        r = httpx.post(url + "/api/detect", json={"sample": "chelsea.png", "vocabulary": "cat, dog",
                                                  "threshold": 0.0}, timeout=60)
        assert r.status_code == 200 and r.json()["width"] == 451 and r.json()["random_weights"]
        r = httpx.post(url + "/api/detect", json={"sample": "chelsea.png", "vocabulary": ""}, timeout=60)
        assert r.status_code == 400 and "the vocabulary is empty" in r.json()["error"]
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
    assert "THE WEIGHTS ARE RANDOM" in (tmp_path / "server.log").read_text()
