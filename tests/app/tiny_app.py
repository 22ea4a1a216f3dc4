"""Shared by the web app's tests: the tiny detector tests/test_api.py uses (the tiny CLIP of
tests/conftest.py on the C4 RPN config, small inputs), test images, and a uvicorn server in a
background thread."""
import base64
import contextlib
import io
import json
import os
import socket
import threading
import time

import numpy as np
import torch
from conftest import TINY_CLIP
from helpers import tiny_cfg
from PIL import Image

from regionclip_d2 import Detector

C4_RPN = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml"
SMALL = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 160,
         "MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST", 50]
VOCAB = ["red square", "blue square"]


def tiny_clip_json(folder) -> str:
    path = os.path.join(str(folder), "tiny_clip.json")
    with open(path, "w") as f:
        json.dump(TINY_CLIP, f)
    return path


def tiny_detector(folder, weights=None) -> Detector:
    """The tiny detector, seeded; random weights unless ``weights`` (a checkpoint of it) is given."""
    torch.manual_seed(0)
    cfg = tiny_cfg(C4_RPN, tiny_clip_json(folder), extra=SMALL)
    return Detector.from_config(cfg, weights=weights, allow_random_weights=weights is None)


@contextlib.contextmanager
def one_torch_thread():
    """One intra-op thread: on a small, busy machine two threads on a tiny model wait on each
    other (seconds per call instead of a fraction of one)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def red_square(h=70, w=100, seed=0) -> np.ndarray:
    """An RGB image: a red square (x 20..65, y 10..45) on a noisy grey background."""
    rng = np.random.default_rng(seed)
    img = rng.integers(100, 140, (h, w, 3), dtype=np.uint8)
    img[10:45, 20:65] = (255, 0, 0)
    return img


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(app, timeout: float = 20.0):
    """Serve ``app`` with uvicorn on a free localhost port in a background thread; yields its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t0 > timeout:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
