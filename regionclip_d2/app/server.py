"""The web app's server: one HTML page and a small JSON API over :class:`regionclip_d2.api.Detector`.

Why FastAPI + uvicorn and one plain HTML/JS page rather than Gradio: two small dependencies
(``fastapi``, ``uvicorn``) instead of Gradio's large tree; no front-end build, no CDN, no
component framework between the page and the model, so the page is one file
(``page.html``) whose elements a browser test drives by id, and the JSON API is tested
in-process with FastAPI's ``TestClient`` on a tiny model; and every error is ours to word:
bad input gets a one-line message on the page (never a stack trace) and the server keeps
serving.

Endpoints:

* ``GET /``: the page (a visible banner when the weights are random).
* ``GET /api/info``: the model (config, random branches, device), the samples, the limits.
* ``GET /api/samples/{name}``: a sample image.
* ``POST /api/detect`` with a JSON body::

      {"image": "data:image/png;base64,...",   # an uploaded file; or instead:
       "sample": "chelsea.png",                # a sample's name (GET /api/info lists them)
       "vocabulary": "cat, dog, coffee cup",   # comma- or newline-separated class names
       "threshold": 0.3,                       # minimum score, 0..1
       "exemplar": {"name": "my mug", "box": "40,60,210,300"}}   # optional: x0,y0,x1,y1 on the image

  answers ``{"detections": [{"label", "score", "box": [x0, y0, x1, y1]}, ...], "image":
  "data:image/jpeg;base64,..." (the picture with labelled boxes), "width", "height",
  "seconds", "random_weights", "notes"}``; boxes are in the pixels of the image as given
  (EXIF orientation applied), best first. Errors answer ``{"error": "..."}`` with 400 (bad
  input), 413 (an upload or image above the limits), 503 (the model could not be loaded) or
  500 (anything else: the message names the exception, the traceback goes to the server log).

Limits (stated on the page): uploads up to :data:`MAX_UPLOAD_BYTES`, images up to
:data:`MAX_IMAGE_PIXELS` (larger ones are refused with the fix, not downscaled: the boxes
stay in the pixels of the image the user gave), at least :data:`MIN_IMAGE_SIDE` pixels a
side, up to :data:`MAX_CLASSES` class names of up to :data:`MAX_NAME_CHARS` characters
(embedding a new name takes about 20 ms with the RN50 text encoder on 2 CPU cores; names are
cached, so the limit bounds a request at about half a minute).

Requests are served one model call at a time (the Detector serialises calls); the model is
built by ``detector_factory`` on first use (``tools/app.py`` builds it before serving).
"""
import base64
import binascii
import html
import io
import json
import logging
import math
import os
import re
import threading
import time
import warnings
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 25 * 1024 * 1024
"""The largest image file accepted (bytes)."""
MAX_IMAGE_PIXELS = 30_000_000
"""The largest image accepted (width x height): a 6000 x 5000 photo fits."""
MIN_IMAGE_SIDE = 8
"""The smallest image side accepted (pixels)."""
MAX_CLASSES = 1500
"""The most class names in one request (LVIS's 1203 fit)."""
MAX_NAME_CHARS = 200
"""The longest class name (characters)."""
DISPLAY_MAX_SIDE = 1024
"""The picture sent back is drawn at most this many pixels on its long side (the table keeps
the image's own pixels)."""
_MAX_BODY = MAX_UPLOAD_BYTES * 4 // 3 + 2 * 1024 * 1024  # the file in base64, plus the vocabulary
_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
SKIMAGE_SAMPLES = ("chelsea.png", "astronaut.png", "coffee.png")


class AppError(Exception):
    """A request the app refuses: ``status`` (HTTP) and a message that names the problem and the fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------------------------ samples
def default_samples(world_test_dir: Optional[str] = None, n_world: int = 6) -> Dict[str, str]:
    """Sample images by name: the first ``n_world`` test images of the synthetic world (when
    ``world_test_dir`` exists; named ``world/<file>``), then the photos scikit-image ships
    (``chelsea.png``, ``astronaut.png``, ``coffee.png``, those present)."""
    samples = {}
    if world_test_dir and os.path.isdir(world_test_dir):
        files = sorted(f for f in os.listdir(world_test_dir) if f.lower().endswith((".png", ".jpg", ".jpeg")))
        for f in files[:n_world]:
            samples[f"world/{f}"] = os.path.join(world_test_dir, f)
    try:
        import skimage.data

        folder = os.path.dirname(skimage.data.__file__)
        for f in SKIMAGE_SAMPLES:
            if os.path.isfile(os.path.join(folder, f)):
                samples[f] = os.path.join(folder, f)
    except ImportError:
        logger.info("scikit-image is not installed: no sample photos")
    return samples


# ------------------------------------------------------------------------------------ inputs
def decode_image(data: bytes, where: str = "the image") -> np.ndarray:
    """An upload's bytes as an ``H x W x 3`` uint8 RGB array (EXIF orientation applied, any pixel
    mode converted as :func:`regionclip_d2.data.images.to_rgb` does); :class:`AppError` for
    non-images, damaged files and images outside the size limits (checked on the header, before
    decoding)."""
    from PIL import Image, ImageOps

    from ..data.images import ImageReadError, to_rgb

    if not data:
        raise AppError(400, f"{where} is empty (0 bytes): choose an image file (JPEG, PNG, BMP, WebP or TIFF)")
    if len(data) > MAX_UPLOAD_BYTES:
        raise AppError(413, f"{where} is {len(data) / 2**20:.1f} MB, above this server's limit of "
                            f"{MAX_UPLOAD_BYTES / 2**20:.0f} MB: save it smaller (e.g. as JPEG) and upload it again")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise AppError(413, f"{where} is far above this server's limit of {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels: "
                            "downscale it (e.g. to 4000 pixels on its long side) and upload it again") from None
    except Exception as e:  # PIL raises several types for non-image data
        raise AppError(400, f"{where} is not an image this server can read ({type(e).__name__}): give a JPEG, PNG, "
                            "BMP, WebP or TIFF file") from None
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        raise AppError(413, f"{where} is {w} x {h} pixels ({w * h / 1e6:.1f} megapixels), above this server's limit "
                            f"of {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels: downscale it (e.g. to 4000 pixels on its "
                            "long side) and upload it again")
    if min(w, h) < MIN_IMAGE_SIDE:
        raise AppError(400, f"{where} is {w} x {h} pixels: too small to detect anything in (at least "
                            f"{MIN_IMAGE_SIDE} pixels a side)")
    try:
        im.load()
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001  a damaged EXIF block: keep the stored orientation
            pass
        rgb = np.ascontiguousarray(np.asarray(to_rgb(im, "")))
    except ImageReadError as e:
        raise AppError(400, f"{where}: {e}") from None
    except Exception as e:  # truncated or damaged data raise many types while decoding
        raise AppError(400, f"{where} could not be decoded ({type(e).__name__}: {e}); the file may be truncated or "
                            "damaged: save it again as JPEG or PNG") from None
    return rgb


def decode_data_url(value, where: str = "the uploaded file") -> bytes:
    """The bytes of ``data:<type>;base64,<data>`` (or bare base64)."""
    if not isinstance(value, str):
        raise AppError(400, f"{where} must be a base64 data URL (a string), got {type(value).__name__}")
    payload = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise AppError(400, f"{where} is not valid base64 data: send the file as a data URL "
                            "(FileReader.readAsDataURL in a browser)") from None


def parse_vocabulary(text) -> Tuple[List[str], List[str]]:
    """Comma- or newline-separated class names: ``(names, notes)``; blank entries are skipped and
    repeated names kept once (with a note). May be empty (the caller decides)."""
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise AppError(400, f"vocabulary must be text (comma-separated class names), got {type(text).__name__}")
    names, notes, seen = [], [], set()
    for n in re.split(r"[,\n]", text):
        n = " ".join(n.split())
        if not n:
            continue
        if n in seen:
            if f"{n!r} is given more than once; it is used once" not in notes:
                notes.append(f"{n!r} is given more than once; it is used once")
            continue
        seen.add(n)
        names.append(n)
    if len(names) > MAX_CLASSES:
        raise AppError(400, f"the vocabulary has {len(names)} class names; the limit is {MAX_CLASSES} per request "
                            "(embedding each new name takes time): give fewer names, or split them over several "
                            "requests")
    long = [n for n in names if len(n) > MAX_NAME_CHARS]
    if long:
        raise AppError(400, f"the class name {long[0][:40]!r}... has {len(long[0])} characters; the limit is "
                            f"{MAX_NAME_CHARS}: shorten it (names are separated by commas)")
    return names, notes


def parse_threshold(value, default: float) -> float:
    """A score threshold in [0, 1]."""
    if value is None or value == "":
        return float(default)
    if isinstance(value, bool):
        raise AppError(400, f"threshold must be a number from 0 to 1, got {value!r}")
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise AppError(400, f"threshold must be a number from 0 to 1, got {str(value)[:40]!r}") from None
    if not math.isfinite(t) or not 0.0 <= t <= 1.0:
        raise AppError(400, f"threshold must be a number from 0 to 1, got {str(value)[:40]!r}")
    return t


def parse_box(value, width: int, height: int) -> List[float]:
    """``"x0,y0,x1,y1"`` (commas and/or spaces) or four numbers: a box on the ``width x height``
    image, XYXY pixels, with area inside the image (it is clipped to the image)."""
    fix = (f"give four numbers x0,y0,x1,y1 in pixels of the {width} x {height} image (left, top, right, bottom; "
           "or drag on the picture)")
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip().strip("[]()")) if p]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise AppError(400, f"the exemplar box must be text like 10,20,110,140; {fix}")
    try:
        box = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise AppError(400, f"the exemplar box {str(value)[:60]!r} is not four numbers: {fix}") from None
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise AppError(400, f"the exemplar box {str(value)[:60]!r} is not four finite numbers: {fix}")
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise AppError(400, f"the exemplar box {box} has x1 <= x0 or y1 <= y0: {fix}")
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise AppError(400, f"the exemplar box {box} lies outside the {width} x {height} image: {fix}")
    return [max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)]


# ------------------------------------------------------------------------------------ drawing
def draw_detections(rgb: np.ndarray, boxes: np.ndarray, labels: Sequence[str], colour_ids: Sequence[int],
                    exemplar: Optional[Tuple[str, Sequence[float]]] = None) -> bytes:
    """A JPEG of the image with labelled boxes (detectron2's ``Visualizer``, as ``tools/demo.py``
    draws), at most :data:`DISPLAY_MAX_SIDE` pixels on its long side (small images are drawn
    larger so that labels stay legible); the exemplar box, if any, dashed white. Detections
    that share one box get one label listing them (``merge_same_box_labels``)."""
    from PIL import Image

    from detectron2.utils.colormap import colormap
    from detectron2.utils.visualizer import Visualizer

    from ..api.results import merge_same_box_labels

    h, w = rgb.shape[:2]
    long_side = max(h, w)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    ex_box = None if exemplar is None else np.asarray(exemplar[1], dtype=np.float32)
    scale = 1.0
    if long_side > DISPLAY_MAX_SIDE:
        f = DISPLAY_MAX_SIDE / long_side
        rgb = np.asarray(Image.fromarray(rgb).resize((max(1, round(w * f)), max(1, round(h * f))),
                                                     Image.BILINEAR))
        boxes = boxes * f
        ex_box = None if ex_box is None else ex_box * f
    else:
        scale = max(1.0, 512.0 / long_side)
    vis = Visualizer(rgb, metadata=None, scale=scale)
    out = vis.output
    if ex_box is not None:
        out = vis.draw_box(ex_box.tolist(), edge_color="white", line_style="--")
        out = vis.draw_text(f"exemplar: {exemplar[0]}", (float(ex_box[0]), float(ex_box[3])), color="white",
                            horizontal_alignment="left")
    if len(boxes):
        palette = colormap(rgb=True, maximum=1)
        boxes, labels, colour_ids = merge_same_box_labels(boxes, list(labels), list(colour_ids))
        out = vis.overlay_instances(boxes=np.asarray(boxes, dtype=np.float32), labels=labels,
                                    assigned_colors=[palette[int(c) % len(palette)] for c in colour_ids])
    buf = io.BytesIO()
    Image.fromarray(out.get_image()).save(buf, format="JPEG", quality=88)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ the app
class _ModelSlot:
    """The detector, built once by the factory on first use (thread-safe); a failed build is
    remembered and reported by every request (rebuilding would fail the same way)."""

    def __init__(self, factory: Callable[[], object]):
        self.factory = factory
        self.detector = None
        self.error = ""
        self.lock = threading.Lock()

    def get(self):
        with self.lock:
            if self.detector is None and not self.error:
                try:
                    self.detector = self.factory()
                except Exception as e:  # noqa: BLE001  reported on the page, the server keeps serving
                    logger.exception("the detector could not be built")
                    self.error = f"{type(e).__name__}: {e}"
            if self.error:
                raise AppError(503, f"the model could not be loaded ({self.error}); fix the server's options "
                                    "(config, weights) and restart it")
            return self.detector


def _detector_info(det) -> dict:
    cfg = getattr(det, "cfg", None)
    info = {"random_weights": str(getattr(det, "random_weights", "") or ""), "device": str(getattr(det, "device", ""))}
    if cfg is not None:
        info.update(weights=os.path.basename(cfg.MODEL.WEIGHTS) if cfg.MODEL.WEIGHTS else "",
                    score_floor=float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST),
                    max_detections=int(cfg.TEST.DETECTIONS_PER_IMAGE))
    return info


def _script_json(obj) -> str:
    """JSON safe inside a ``<script>`` element."""
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def create_app(detector_factory: Callable[[], object], *, samples: Optional[Mapping[str, str]] = None,
               default_vocabulary: str = "cat, person, cup, plate, flower", default_threshold: float = 0.3,
               default_sample: Optional[str] = None, title: str = "RegionCLIP open-vocabulary detection",
               about: str = ""):
    """The FastAPI app (serve it with uvicorn; see the module docstring for the endpoints).

    Args:
        detector_factory: builds the :class:`~regionclip_d2.api.Detector` (called once, on
            first use; tests pass a tiny model). Its ``random_weights`` decides the banner.
        samples: sample images ``{name: path}`` (default: :func:`default_samples` without the
            synthetic world).
        default_vocabulary, default_threshold, default_sample: what the page starts with.
        title: the page's title; about: one line under it (e.g. the config and weights).
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool

    from ..api import DetectorInputError, Exemplar
    from ..data.vocabularies import VocabularyError

    samples = dict(default_samples() if samples is None else samples)
    if default_sample is not None and default_sample not in samples:
        raise ValueError(f"default_sample {default_sample!r} is not one of the samples {list(samples)}")
    if isinstance(default_threshold, bool) or not isinstance(default_threshold, (int, float)) \
            or not 0.0 <= default_threshold <= 1.0:
        raise ValueError(f"default_threshold={default_threshold!r}: give a number from 0 to 1")
    default_threshold = float(default_threshold)
    slot = _ModelSlot(detector_factory)
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.load_detector = slot.get
    limits = {"max_upload_bytes": MAX_UPLOAD_BYTES, "max_image_pixels": MAX_IMAGE_PIXELS,
              "min_image_side": MIN_IMAGE_SIDE, "max_classes": MAX_CLASSES, "max_name_chars": MAX_NAME_CHARS}

    def error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    def info() -> dict:
        model = {"random_weights": "", "error": ""}
        try:
            model.update(_detector_info(slot.get()))
        except AppError as e:
            model["error"] = e.message
        return {"title": title, "about": about, "model": model, "samples": list(samples), "limits": limits,
                "defaults": {"vocabulary": default_vocabulary, "threshold": default_threshold,
                             "sample": default_sample if default_sample is not None else next(iter(samples), "")}}

    @app.get("/", response_class=HTMLResponse)
    def page():
        state = info()
        model = state["model"]
        banner = ""
        if model["error"]:
            banner = (f'<div id="model-error" class="banner" role="alert">{html.escape(model["error"])}</div>')
        elif model["random_weights"]:
            banner = ('<div id="random-banner" class="banner" role="alert">RANDOM WEIGHTS ('
                      f'{html.escape(model["random_weights"])}): the boxes and labels are meaningless. This only '
                      'shows that the pipeline runs; restart with <code>--weights</code> (and '
                      '<code>--rpn-weights</code>) for real detections.</div>')
        with open(_PAGE, encoding="utf-8") as f:
            text = f.read()
        for key, value in (("TITLE", html.escape(title)), ("ABOUT", html.escape(about)), ("BANNER", banner),
                           ("STATE", _script_json(state))):
            text = text.replace("{{" + key + "}}", value)
        return HTMLResponse(text, headers={"Cache-Control": "no-store"})

    @app.get("/api/info")
    def api_info():
        return info()

    @app.get("/api/samples/{name:path}")
    def sample(name: str):
        if name not in samples:
            return error(404, f"no sample named {name!r}: the samples are {', '.join(samples) or '(none)'}")
        return FileResponse(samples[name])

    @app.post("/api/detect")
    async def detect(request: Request):
        try:
            body = await _read_body(request, _MAX_BODY)
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise AppError(400, "the request body is not JSON: send {\"image\" or \"sample\", \"vocabulary\", "
                                    "\"threshold\", \"exemplar\"} (see GET /api/info)") from None
            if not isinstance(payload, dict):
                raise AppError(400, "the request body must be a JSON object with \"image\" or \"sample\" and "
                                    "\"vocabulary\"")
            return JSONResponse(await run_in_threadpool(run, payload))
        except AppError as e:
            logger.info("refused (%d): %s", e.status, e.message)
            return error(e.status, e.message)
        except Exception as e:  # noqa: BLE001  the server keeps serving; the traceback goes to its log
            logger.exception("/api/detect failed")
            return error(500, f"the detection failed ({type(e).__name__}: {str(e)[:300]}); the server keeps "
                              "running, details are in its log")

    def run(payload: dict) -> dict:
        names, notes = parse_vocabulary(payload.get("vocabulary"))
        threshold = parse_threshold(payload.get("threshold"), default_threshold)
        ex = payload.get("exemplar") or {}
        if not isinstance(ex, dict):
            raise AppError(400, "exemplar must be an object {\"name\": ..., \"box\": \"x0,y0,x1,y1\"}")
        ex_name = " ".join(str(ex.get("name") or "").split())
        ex_box_text = ex.get("box") or ""
        if not names and not (ex_name or ex_box_text):
            raise AppError(400, "the vocabulary is empty: type at least one class name (comma-separated, e.g. "
                                "\"cat, dog, coffee cup\"), or give an exemplar box with a name")
        if ex_box_text and not ex_name:
            raise AppError(400, "the exemplar box needs a name: the label its detections get (e.g. \"my mug\")")
        if ex_name and not ex_box_text:
            raise AppError(400, f"the exemplar {ex_name!r} needs a box x0,y0,x1,y1 on the current image (drag on "
                                "the picture, or type four numbers)")
        if ex_name and ex_name in names:
            raise AppError(400, f"the exemplar name {ex_name!r} is also in the vocabulary: give the exemplar "
                                f"another name (e.g. \"{ex_name} (example)\") or remove it from the vocabulary")
        if ex_name and len(names) + 1 > MAX_CLASSES:
            raise AppError(400, f"the vocabulary and the exemplar make {len(names) + 1} classes; the limit is "
                                f"{MAX_CLASSES}: give fewer names")
        image, sample_name = payload.get("image"), payload.get("sample")
        if image:
            rgb = decode_image(decode_data_url(image), "the uploaded file")
        elif sample_name:
            if sample_name not in samples:
                raise AppError(400, f"no sample named {str(sample_name)[:80]!r}: pick one of "
                                    f"{', '.join(samples) or '(none)'}, or upload an image")
            with open(samples[sample_name], "rb") as f:
                rgb = decode_image(f.read(), f"sample {sample_name!r}")
        else:
            raise AppError(400, "no image: upload an image file or pick a sample")
        h, w = rgb.shape[:2]
        classes: List[object] = list(names)
        exemplar = None
        if ex_name:
            box = parse_box(ex_box_text, w, h)
            exemplar = (ex_name, box)
            classes.append(Exemplar(ex_name, rgb, [box]))
        det = slot.get()
        t0 = time.perf_counter()
        try:
            res = det(rgb, classes=classes, threshold=threshold)
        except (DetectorInputError, VocabularyError) as e:
            raise AppError(400, str(e)) from None
        seconds = time.perf_counter() - t0
        labels = [f"{lab} {s:.2f}" for lab, s in zip(res.labels, res.scores)]
        jpeg = draw_detections(rgb, res.boxes, labels, res.label_ids, exemplar)
        random_weights = str(getattr(det, "random_weights", "") or "")
        logger.info("%d x %d image, %d classes, threshold %.2f: %d detection(s) in %.1f s", w, h, len(classes),
                    threshold, len(res), seconds)
        return {"detections": [{"label": lab, "score": round(float(s), 4), "box": [round(float(v), 1) for v in b]}
                               for lab, s, b in zip(res.labels, res.scores, res.boxes)],
                "image": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii"),
                "width": w, "height": h, "seconds": round(seconds, 2), "threshold": threshold,
                "classes": len(classes), "random_weights": random_weights, "notes": notes}

    return app


async def _read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (by its Content-Length when sent,
    else while reading)."""
    too_big = AppError(413, f"the request is larger than this server's limit ({limit / 2**20:.0f} MB; images up to "
                            f"{MAX_UPLOAD_BYTES / 2**20:.0f} MB): upload a smaller file")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)
