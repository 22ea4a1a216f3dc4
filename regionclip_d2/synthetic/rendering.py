"""Drawing one synthetic-world image: shape masks, the textured background, placement
with mild occlusion, and ``DrawnObject`` (what was drawn where)."""
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .shapes import SHAPES
from .world_config import WorldConfig


@dataclass
class DrawnObject:
    """One object as drawn: ``bbox`` XYWH of its visible pixels, ``area`` = visible pixel
    count, ``mask`` ``[H, W]`` bool of visible pixels (only kept when asked for)."""

    shape: str
    color: str
    size: float
    center: Tuple[float, float]
    bbox: Tuple[int, int, int, int]
    area: int
    mask: Optional[np.ndarray] = None


def _shape_mask(shape: str, size: float, angle: float, aspect: float) -> np.ndarray:
    """Tight boolean mask ``[h, w]`` of a shape of diameter ``size`` px, rotated by
    ``angle`` (radians) after stretching x by ``aspect``."""
    pad = int(math.ceil(size)) + 4
    c = pad / 2.0
    cos, sin = math.cos(angle), math.sin(angle)
    rot = np.array([[cos, -sin], [sin, cos]])
    img = Image.new("L", (pad, pad), 0)
    draw = ImageDraw.Draw(img)
    for poly, fill in SHAPES[shape]:
        p = (poly * np.array([aspect, 1.0])) @ rot.T * (size / 2.0) + c
        draw.polygon([tuple(q) for q in p.tolist()], fill=255 if fill else 0)
    m = np.asarray(img) > 0
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if rows.size == 0:
        return np.ones((1, 1), bool)
    return m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    """Textured, noisy, desaturated background ``[s, s, 3]`` float32 in 0..255."""
    base = rng.uniform(70, 185) + rng.uniform(-22, 22, 3)
    low = rng.uniform(-35, 35, (3, 3, 3)) + 128
    bg = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((s, s), Image.BILINEAR), np.float32)
    bg = bg - 128 + base.astype(np.float32)
    kind = rng.integers(3)
    amp = rng.uniform(8, 22)
    if kind == 0:  # stripes
        theta, freq = rng.uniform(0, math.pi), rng.uniform(0.15, 0.6)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        tex = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * freq + rng.uniform(0, 6.3))
        bg += (amp * tex)[..., None]
    elif kind == 1:  # blotches
        n = int(rng.integers(6, 16))
        mid = rng.uniform(-1, 1, (n, n)).astype(np.float32)
        tex = np.asarray(Image.fromarray(mid, mode="F").resize((s, s), Image.BILINEAR))
        bg += (amp * tex)[..., None]
    # kind 2: plain (low-frequency colour field + noise only)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 6))):  # faint clutter lines
        pts = rng.uniform(0, s, 4).tolist()
        tone = tuple(int(v) for v in np.clip(base + rng.uniform(-45, 45, 3), 0, 255))
        draw.line(pts, fill=tone, width=int(rng.integers(1, 3)))
    return np.asarray(img, np.float32)


def _box_overlap(a, b) -> float:
    """Intersection of two XYWH boxes over the smaller box's area."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / min(a[2] * a[3], b[2] * b[3])


def render_image(cfg: WorldConfig, rng: np.random.Generator, keep_masks: bool = False):
    """Draw one image.

    Returns:
        image: ``[S, S, 3]`` uint8 RGB.
        objects: list of ``DrawnObject`` in drawing order (later ones on top). An object that
            finds no place in 30 tries (shrinking towards ``min_size``) without hiding more
            than ``1 - min_visible`` of another or overlapping a box by more than
            ``max_box_overlap`` is dropped, so the list may be shorter than the sampled count.
    """
    s = cfg.image_size
    canvas = _background(rng, s)
    owner = np.full((s, s), -1, np.int16)
    if cfg.min_objects == 1 and rng.random() < cfg.single_object_prob:
        n = 1
    else:
        lo = max(2, cfg.min_objects) if cfg.max_objects > 1 else 1
        n = int(rng.integers(lo, cfg.max_objects + 1))
    full_area: List[int] = []
    visible: List[int] = []
    placed = []
    boxes: List[Tuple[int, int, int, int]] = []
    color_names = list(cfg.colors)
    lo_size, hi_size = (cfg.single_min_size, cfg.single_max_size) if n == 1 else (cfg.min_size, cfg.max_size)
    for _ in range(n):
        shape = cfg.categories[int(rng.integers(len(cfg.categories)))]
        color = color_names[int(rng.integers(len(color_names)))]
        size = rng.uniform(lo_size, hi_size)
        if cfg.max_rotation >= 180.0:
            angle = rng.uniform(0, 2 * math.pi)
        else:  # one draw either way, so a seed's other draws do not move
            angle = math.radians(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
        aspect = rng.uniform(0.9, 1.1)  # mild: a stretched square must not pass for a diamond
        for attempt in range(30):
            if attempt and attempt % 6 == 0:
                size = max(lo_size, size * 0.85)
            m = _shape_mask(shape, size, angle, aspect)
            h, w = m.shape
            if h > s or w > s:
                size = max(lo_size, size * 0.85)
                continue
            y0, x0 = int(rng.integers(0, s - h + 1)), int(rng.integers(0, s - w + 1))
            if any(_box_overlap((x0, y0, w, h), b) > cfg.max_box_overlap for b in boxes):
                continue
            region = owner[y0:y0 + h, x0:x0 + w]
            covered = region[m]
            covered = covered[covered >= 0]
            if covered.size and placed:
                lost = np.bincount(covered, minlength=len(placed))
                after = np.asarray(visible) - lost
                if np.any(after < cfg.min_visible * np.asarray(full_area)):
                    continue
                for k in np.flatnonzero(lost):
                    visible[k] -= int(lost[k])
            region[m] = len(placed)
            rgb = np.asarray(cfg.colors[color], np.float32) + rng.uniform(-18, 18, 3).astype(np.float32)
            canvas[y0:y0 + h, x0:x0 + w][m] = rgb
            placed.append((shape, color, float(size), (x0 + w / 2.0, y0 + h / 2.0)))
            boxes.append((x0, y0, w, h))
            full_area.append(int(m.sum()))
            visible.append(int(m.sum()))
            break
    noise = rng.uniform(4, 14)
    canvas += rng.uniform(-noise, noise, canvas.shape).astype(np.float32)
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    objects = []
    for k, (shape, color, size, center) in enumerate(placed):
        mk = owner == k
        rows, cols = np.flatnonzero(mk.any(1)), np.flatnonzero(mk.any(0))
        bbox = (int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))
        objects.append(DrawnObject(shape, color, size, center, bbox, int(mk.sum()),
                                   mk if keep_masks else None))
    return image, objects
