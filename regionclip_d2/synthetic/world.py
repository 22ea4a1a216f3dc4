"""A seeded synthetic open-vocabulary detection world: shapes on textured backgrounds.

Each image (``image_size`` x ``image_size`` px, RGB) shows 1..``max_objects`` coloured
shapes (``circle``, ``star``, ``moon``, ...) of random size, rotation and aspect, placed with
mild occlusion on a noisy textured background with faint clutter lines. Every image
comes with template captions that mention some of its objects with counts, colours,
sizes and spatial relations ("two red stars next to a blue ring", "a photo of a moon").

The categories are split into *base* and *novel*. Training annotations never contain a
novel box (those annotations are removed from the train JSON), but novel shapes are
drawn in training images and named in training captions, exactly the setting of
open-vocabulary detection: boxes for base classes, only image-level text for novel ones.

Lessons from the feasibility study (``shared/docs/SYNTHETIC.md``) are defaults here:
colour is a shortcut, so only ``colour_prob`` = 50% of captions name colours; about 45%
of the images show a single object; objects are at least 20% of the image side.

Outputs, all ordinary files the regular loaders read (``generate_world``)::

    <out>/world.json                          description of the world (see ``world_description``)
    <out>/{train,val,test}/<split>_000000.png images
    <out>/annotations/instances_<split>.json  COCO instances (bbox XYWH in pixels)
    <out>/annotations/captions_<split>.jsonl  {"file_name", "image_id", "caption"} per line

Only numpy and PIL are used; generation is deterministic given the seed (each image has its
own random stream derived from ``(seed, split, index)``, so results do not depend on the
number of worker processes).
"""
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

WORLD_FORMAT_VERSION = 1
RENDER_REVISION = 1  # bump when drawing or caption code changes what a seed produces
SPLITS = ("train", "val", "test")

# ---------------------------------------------------------------------------------------
# Shapes: each is a list of (polygon [K, 2] in unit coordinates (x right, y down), fill)
# drawn in order on a mask; fill 0 cuts holes (ring, frame, moon).
# ---------------------------------------------------------------------------------------


def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], 1) * radius


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    t = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([np.cos(t) * r, np.sin(t) * r], 1)


def _heart(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], 1)


def _cross(a: float = 0.3) -> np.ndarray:
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1),
                     (-a, a), (-1, a), (-1, -a), (-a, -a)], dtype=float)


def _box(h: float) -> np.ndarray:
    return np.array([(-h, -h), (h, -h), (h, h), (-h, h)], dtype=float)


_SHAPE_PARTS = {
    "circle": [(_regular(40), 1)],
    "square": [(_box(0.8), 1)],
    "triangle": [(_regular(3), 1)],
    "star": [(_star(), 1)],
    "cross": [(_cross(), 1)],
    "ring": [(_regular(40), 1), (_regular(40, 0.58), 0)],
    "diamond": [(np.array([(0, -1), (0.52, 0), (0, 1), (-0.52, 0)], dtype=float), 1)],
    "pentagon": [(_regular(5), 1)],
    "arrow": [(np.array([(-1, -0.22), (0.15, -0.22), (0.15, -0.62), (1, 0), (0.15, 0.62), (0.15, 0.22),
                         (-1, 0.22)], dtype=float), 1)],
    "frame": [(_box(0.78), 1), (_box(0.46), 0)],
    "ellipse": [(_regular(40) * np.array([1.0, 0.55]), 1)],
    "heart": [(_heart(), 1)],
    "hexagon": [(_regular(6, phase=0.0), 1)],
    "moon": [(_regular(40), 1), (_regular(40, 0.88) + np.array([0.5, -0.05]), 0)],
    "bolt": [(np.array([(-0.05, -1), (0.6, -1), (0.15, -0.22), (0.55, -0.22), (-0.4, 1), (-0.05, 0.08),
                        (-0.45, 0.08)], dtype=float), 1)],
}


def _normalise_parts(parts):
    """Centre the filled polygons' bounding box on 0 and scale to radius 1."""
    filled = np.concatenate([p for p, f in parts if f])
    centre = (filled.min(0) + filled.max(0)) / 2
    radius = np.sqrt(((filled - centre) ** 2).sum(1)).max()
    return [((p - centre) / radius, f) for p, f in parts]


SHAPES: Dict[str, list] = {k: _normalise_parts(v) for k, v in _SHAPE_PARTS.items()}
"""Every drawable shape: name -> list of (unit polygon ``[K, 2]``, fill 0/1)."""

PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "cross": "crosses", "ring": "rings", "diamond": "diamonds", "pentagon": "pentagons",
           "arrow": "arrows", "frame": "frames", "ellipse": "ellipses", "heart": "hearts",
           "hexagon": "hexagons", "moon": "moons", "bolt": "bolts"}

DEFAULT_BASE = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "pentagon", "arrow",
                "frame")
DEFAULT_NOVEL = ("heart", "hexagon", "moon", "bolt")
DEFAULT_CATEGORIES = DEFAULT_BASE + DEFAULT_NOVEL

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (240, 215, 35), "green": (35, 165, 55),
    "blue": (35, 75, 220), "purple": (135, 50, 185), "white": (245, 245, 245), "black": (20, 20, 20),
}
"""The 8 object colours (name -> RGB 0..255); each object is jittered by up to +-18 per channel."""

_NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
            9: "nine", 10: "ten"}
_PREFIXES = ("a photo of", "an image of", "a picture of", "a drawing of", "a rendering of", "there is")
_SUFFIXES = ("on a textured background", "on a noisy background", "in the picture", "in the scene")


class WorldConfigError(ValueError):
    """A synthetic-world parameter is invalid; the message names the parameter and the fix."""


@dataclass
class WorldConfig:
    """Parameters of a synthetic world (all sizes in pixels).

    Attributes:
        image_size: side of the square images, a multiple of 32 in 96..320 (the CLIP image
            tower's attention pool needs ``image_size / 32`` cells).
        categories: shape names (subset of ``SHAPES``), in category-id order (ids 1..C).
        novel: the categories without training boxes; the others are base.
        min_objects, max_objects: objects per image (before placement failures).
        single_object_prob: probability of exactly one object (if ``min_objects == 1``);
            other counts are uniform in ``max(2, min_objects)..max_objects``.
        min_size, max_size: object diameter (circumscribed circle, px); default 20% and 50%
            of ``image_size``.
        single_min_size, single_max_size: object diameter in single-object images (default:
            ``min_size``, ``max_size``). Larger values make those images object-centric, like
            the photos CLIP learns from, so that the whole-image view of an object resembles
            the region view a detector pools.
        min_visible: an earlier object keeps at least this fraction of its pixels visible
            when later objects are drawn over it (mild occlusion).
        max_box_overlap: two objects' boxes may share at most this fraction of the smaller
            box (keeps objects apart enough for relations and detection).
        colour_prob: probability that a caption names colours.
        partial_prob: probability that a caption mentions only some of the objects.
        captions_per_image: captions written per image (>= 1).
        seed: master seed.
    """

    image_size: int = 128
    categories: Sequence[str] = DEFAULT_CATEGORIES
    novel: Sequence[str] = DEFAULT_NOVEL
    min_objects: int = 1
    max_objects: int = 4
    single_object_prob: float = 0.45
    min_size: Optional[int] = None
    max_size: Optional[int] = None
    single_min_size: Optional[int] = None
    single_max_size: Optional[int] = None
    min_visible: float = 0.7
    max_box_overlap: float = 0.35
    colour_prob: float = 0.5
    partial_prob: float = 0.25
    captions_per_image: int = 2
    seed: int = 0
    colors: Dict[str, Tuple[int, int, int]] = field(default_factory=lambda: dict(COLORS))

    def __post_init__(self):
        self.categories = tuple(self.categories)
        self.novel = tuple(self.novel)
        if self.min_size is None:
            self.min_size = int(round(0.2 * self.image_size))
        if self.max_size is None:
            self.max_size = int(round(0.5 * self.image_size))
        if self.single_min_size is None:
            self.single_min_size = self.min_size
        if self.single_max_size is None:
            self.single_max_size = self.max_size
        self.validate()

    @property
    def base(self) -> Tuple[str, ...]:
        return tuple(c for c in self.categories if c not in self.novel)

    def validate(self):
        """Raise ``WorldConfigError`` naming the first invalid parameter."""
        s = self.image_size
        if not isinstance(s, int) or s < 96 or s > 320 or s % 32:
            raise WorldConfigError(
                f"image_size={s!r} is not supported: use a multiple of 32 between 96 and 320 (the CLIP "
                "image tower's attention pool works on image_size/32 cells), e.g. 128")
        if not self.categories:
            raise WorldConfigError("the category list is empty: give at least two shape names, e.g. "
                                   f"{','.join(DEFAULT_CATEGORIES)}")
        dup = sorted({c for c in self.categories if self.categories.count(c) > 1})
        if dup:
            raise WorldConfigError(f"duplicated categories {dup}: list each shape once")
        unknown = [c for c in self.categories if c not in SHAPES]
        if unknown:
            raise WorldConfigError(f"unknown shape categories {unknown}: choose among {sorted(SHAPES)}")
        bad_novel = [c for c in self.novel if c not in self.categories]
        if bad_novel:
            raise WorldConfigError(
                f"novel categories {bad_novel} are not among the categories {list(self.categories)}: "
                "name novel classes from the category list (or add them to it)")
        if len(set(self.novel)) != len(self.novel):
            raise WorldConfigError(f"duplicated novel categories in {list(self.novel)}: list each once")
        if not self.base:
            raise WorldConfigError("every category is novel: leave at least one base category with "
                                   "training boxes")
        if not 1 <= self.min_objects <= self.max_objects:
            raise WorldConfigError(
                f"impossible object counts min_objects={self.min_objects}, max_objects={self.max_objects}: "
                "need 1 <= min_objects <= max_objects")
        if not 0 < self.min_size <= self.max_size:
            raise WorldConfigError(f"object sizes min_size={self.min_size}, max_size={self.max_size} px are "
                                   "invalid: need 0 < min_size <= max_size")
        if self.min_size < 8:
            raise WorldConfigError(f"min_size={self.min_size} px is too small to draw a recognisable "
                                   "shape: use at least 8 px")
        if self.max_size > s:
            raise WorldConfigError(f"max_size={self.max_size} px is larger than the image ({s} px): "
                                   f"use max_size <= image_size (default {int(round(0.5 * s))})")
        if not 8 <= self.single_min_size <= self.single_max_size <= s:
            raise WorldConfigError(f"single-object sizes single_min_size={self.single_min_size}, single_max_size="
                                   f"{self.single_max_size} px are invalid: need 8 <= single_min_size <= "
                                   f"single_max_size <= image_size ({s})")
        # Objects of the smallest size cover about (pi/4) min_size^2 each; with at most
        # 30% occluded they need that much free area: refuse counts that cannot fit.
        need = self.max_objects * 0.7 * (math.pi / 4) * self.min_size ** 2
        if need > 0.6 * s * s:
            fit = max(1, int(0.6 * s * s / (0.7 * (math.pi / 4) * self.min_size ** 2)))
            raise WorldConfigError(
                f"impossible object counts: max_objects={self.max_objects} objects of at least "
                f"{self.min_size} px do not fit in a {s} px image; use max_objects <= {fit} or a smaller "
                "min_size / larger image_size")
        for name in ("single_object_prob", "colour_prob", "partial_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise WorldConfigError(f"{name}={v} is not a probability in [0, 1]")
        if not 0.0 <= self.max_box_overlap <= 1.0:
            raise WorldConfigError(f"max_box_overlap={self.max_box_overlap} must lie in [0, 1]")
        if not 0.0 <= self.min_visible <= 1.0:
            raise WorldConfigError(f"min_visible={self.min_visible} must lie in [0, 1]")
        if self.captions_per_image < 1:
            raise WorldConfigError(f"captions_per_image={self.captions_per_image}: need at least 1")
        if len(self.colors) < 1:
            raise WorldConfigError("no colours given")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["categories"] = list(self.categories)
        d["novel"] = list(self.novel)
        d["colors"] = {k: list(v) for k, v in self.colors.items()}
        return d

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the parameters, the shapes' geometry and the render revision:
        equal fingerprints mean the same world."""
        geometry = {c: [[np.round(p, 4).tolist(), f] for p, f in SHAPES[c]] for c in self.categories}
        blob = json.dumps({"version": WORLD_FORMAT_VERSION, "render": RENDER_REVISION, "geometry": geometry,
                           **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------


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
        angle = rng.uniform(0, 2 * math.pi)
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


# ---------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(count: int, noun: str, adjectives: List[str]) -> str:
    words = adjectives + [noun if count == 1 else PLURALS.get(noun, noun + "s")]
    if count == 1:
        return f"{_article(words[0])} {' '.join(words)}"
    return f"{_NUMBERS.get(count, 'many')} {' '.join(words)}"


def _relation(a: Tuple[float, float], b: Tuple[float, float], rng) -> str:
    dx, dy = a[0] - b[0], a[1] - b[1]
    if rng.random() < 0.3:
        return ["next to", "near", "beside", "with"][int(rng.integers(4))]
    if abs(dx) > 1.3 * abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    if abs(dy) > 1.3 * abs(dx):
        return "above" if dy < 0 else "below"
    return "next to"


def make_caption(objects: Sequence[DrawnObject], cfg: WorldConfig, rng: np.random.Generator) -> str:
    """A template caption of some of ``objects``: counts, colours (with ``colour_prob``),
    size words, a spatial relation between two groups, optional prefix / suffix. At most
    three groups are named (short enough for a 24-token text context)."""
    if not objects:
        return "an empty textured background"
    use_colour = rng.random() < cfg.colour_prob
    groups: Dict[tuple, List[DrawnObject]] = {}
    for o in objects:
        groups.setdefault((o.color, o.shape) if use_colour else (o.shape,), []).append(o)
    keys = list(groups)
    order = rng.permutation(len(keys))
    keys = [keys[i] for i in order]
    if len(keys) > 1 and rng.random() < cfg.partial_prob:
        keys = keys[:int(rng.integers(1, len(keys)))]
    keys = keys[:3]
    span = max(cfg.max_size - cfg.min_size, 1e-6)
    phrases, centres = [], []
    for key in keys:
        members = groups[key]
        adjectives = []
        if len(members) == 1 and rng.random() < 0.2:
            rel = (members[0].size - cfg.min_size) / span
            if rel < 0.33:
                adjectives.append("small")
            elif rel > 0.67:
                adjectives.append(["large", "big"][int(rng.integers(2))])
        if use_colour:
            adjectives.append(key[0])
        phrases.append(_phrase(len(members), key[-1], adjectives))
        centres.append(tuple(np.mean([m.center for m in members], 0)))
    if len(phrases) == 2 and rng.random() < 0.5:
        body = f"{phrases[0]} {_relation(centres[0], centres[1], rng)} {phrases[1]}"
    elif len(phrases) == 1:
        body = phrases[0]
    else:
        body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    r = rng.random()
    if r < 0.45:
        prefix = _PREFIXES[int(rng.integers(len(_PREFIXES)))]
        if prefix == "there is" and not phrases[0].startswith(("a ", "an ")):
            prefix = "there are"
        body = f"{prefix} {body}"
    elif r < 0.55 and len(phrases) <= 2:
        body = f"{body} {_SUFFIXES[int(rng.integers(len(_SUFFIXES)))]}"
    return body


# ---------------------------------------------------------------------------------------
# Whole data set
# ---------------------------------------------------------------------------------------


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of image ``index`` of ``split`` (independent of other images)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS.index(split), int(index)]))


def file_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.png"


def generate_sample(cfg: WorldConfig, split: str, index: int, keep_masks: bool = False):
    """Image ``index`` of ``split``: (image ``[S, S, 3]`` uint8, objects, captions)."""
    rng = image_rng(cfg.seed, split, index)
    image, objects = render_image(cfg, rng, keep_masks=keep_masks)
    captions = [make_caption(objects, cfg, rng) for _ in range(cfg.captions_per_image)]
    return image, objects, captions


def _render_and_save(args):
    cfg, split, index, image_dir = args
    image, objects, captions = generate_sample(cfg, split, index)
    # lossless; Huffman-only deflate: noisy pixels barely compress, this is 1.5x faster and smaller
    Image.fromarray(image).save(os.path.join(image_dir, file_name(split, index)), compress_level=1,
                                compress_type=2)
    return index, [(o.shape, o.color, o.bbox, o.area) for o in objects], captions


def _paths(output_dir: str, split: str) -> Dict[str, str]:
    return {"images": os.path.join(output_dir, split),
            "instances": os.path.join(output_dir, "annotations", f"instances_{split}.json"),
            "captions": os.path.join(output_dir, "annotations", f"captions_{split}.jsonl")}


def world_paths(world_dir: str, split: str) -> Dict[str, str]:
    """Absolute paths of a split: ``images`` (folder), ``instances`` (COCO JSON), ``captions`` (JSONL)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {SPLITS}")
    return _paths(os.path.abspath(world_dir), split)


def categories_json(cfg: WorldConfig) -> List[dict]:
    """COCO ``categories``: ids 1..C in ``cfg.categories`` order, with ``split`` base/novel."""
    return [{"id": i + 1, "name": c, "supercategory": "shape",
             "split": "novel" if c in cfg.novel else "base"} for i, c in enumerate(cfg.categories)]


def generate_split(cfg: WorldConfig, output_dir: str, split: str, num_images: int, workers: int = 1,
                   progress: bool = False) -> dict:
    """Render ``num_images`` images of ``split`` and write the images, the COCO JSON and the
    captions JSONL. Novel-category annotations are left out of the ``train`` JSON.

    Returns counts: ``{"images", "annotations", "novel_annotations_removed", "captions"}``.
    """
    if num_images < 0:
        raise WorldConfigError(f"num_images={num_images} for split {split!r} must be >= 0")
    paths = _paths(output_dir, split)
    os.makedirs(paths["images"], exist_ok=True)
    os.makedirs(os.path.dirname(paths["instances"]), exist_ok=True)
    jobs = [(cfg, split, i, paths["images"]) for i in range(num_images)]
    if workers > 1 and num_images > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as ex:
            results = ex.map(_render_and_save, jobs, chunksize=64)
            results = list(_progress(results, num_images, split, progress))
    else:
        results = [_render_and_save(j) for j in _progress(jobs, num_images, split, progress)]
    cat_ids = {c: i + 1 for i, c in enumerate(cfg.categories)}
    images, annotations, caption_lines, removed = [], [], [], 0
    for index, objects, captions in results:
        image_id = index + 1
        name = file_name(split, index)
        images.append({"id": image_id, "file_name": name, "height": cfg.image_size, "width": cfg.image_size})
        for shape, color, bbox, area in objects:
            if split == "train" and shape in cfg.novel:
                removed += 1
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": cat_ids[shape], "bbox": [float(v) for v in bbox],
                                "area": float(area), "iscrowd": 0, "color": color})
        caption_lines.extend({"file_name": name, "image_id": image_id, "caption": c} for c in captions)
    coco = {"info": {"description": f"synthetic open-vocabulary shapes world, split {split}",
                     "version": str(WORLD_FORMAT_VERSION), "world_fingerprint": cfg.fingerprint()},
            "licenses": [], "images": images, "annotations": annotations,
            "categories": categories_json(cfg)}
    with open(paths["instances"], "w") as f:
        json.dump(coco, f)
    with open(paths["captions"], "w") as f:
        for line in caption_lines:
            f.write(json.dumps(line) + "\n")
    return {"images": len(images), "annotations": len(annotations), "novel_annotations_removed": removed,
            "captions": len(caption_lines)}


def _progress(it, total, split, enabled):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=f"{split} images", unit="img")


def world_description(cfg: WorldConfig, counts: Dict[str, dict]) -> dict:
    """The content of ``world.json``: parameters, categories, colours, counts, file paths."""
    return {
        "format_version": WORLD_FORMAT_VERSION,
        "generator": "regionclip_d2.synthetic.world",
        "render_revision": RENDER_REVISION,
        "fingerprint": cfg.fingerprint(),
        "seed": cfg.seed,
        "image_size": cfg.image_size,
        "categories": categories_json(cfg),
        "base": list(cfg.base),
        "novel": list(cfg.novel),
        "colors": {k: list(v) for k, v in cfg.colors.items()},
        "counts": counts,
        "params": cfg.to_dict(),
        "files": {split: _paths("", split) for split in counts},  # relative to the world folder
    }


def generate_world(output_dir: str, num_train: int = 2000, num_val: int = 300, num_test: int = 300,
                   workers: int = 1, progress: bool = False, config: Optional[WorldConfig] = None,
                   **params) -> dict:
    """Generate a whole world under ``output_dir`` (see the module docstring for the layout).

    Args:
        output_dir: folder (created); existing files of the same names are overwritten.
        num_train, num_val, num_test: images per split.
        workers: processes rendering images (the output does not depend on it).
        progress: show tqdm progress bars.
        config: a ready ``WorldConfig`` (else one is built from ``params``).
        **params: ``WorldConfig`` fields (``image_size``, ``max_objects``, ``seed``, ``novel``, ...).

    Returns:
        the ``world.json`` content (dict).
    """
    if config is not None and params:
        raise TypeError(f"give either config= or WorldConfig fields ({sorted(params)}), not both")
    cfg = config if config is not None else WorldConfig(**params)
    os.makedirs(output_dir, exist_ok=True)
    counts = {}
    for split, n in (("train", num_train), ("val", num_val), ("test", num_test)):
        counts[split] = generate_split(cfg, output_dir, split, n, workers=workers, progress=progress)
    desc = world_description(cfg, counts)
    with open(os.path.join(output_dir, "world.json"), "w") as f:
        json.dump(desc, f, indent=1)
    return desc


def load_world(world_dir: str) -> dict:
    """Read ``<world_dir>/world.json`` (raises a clear error when the folder is no world)."""
    path = os.path.join(world_dir, "world.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: {world_dir!r} is not a synthetic world; create one with "
            f"`python tools/make_synthetic_ovd.py --output-dir {world_dir}`")
    with open(path) as f:
        world = json.load(f)
    if world.get("format_version") != WORLD_FORMAT_VERSION:
        raise ValueError(f"{path} has format version {world.get('format_version')!r}, this code reads "
                         f"{WORLD_FORMAT_VERSION}: regenerate the world")
    return world


def check_same_world(expected_fingerprint: str, world_dir: str):
    """Raise when ``world_dir`` is not the world a later stage was built from."""
    got = load_world(world_dir)["fingerprint"]
    if got != expected_fingerprint:
        raise ValueError(f"world mismatch: {world_dir!r} has fingerprint {got}, the inputs were made from "
                         f"world {expected_fingerprint}; regenerate or point to the matching world")


def read_captions(path: str) -> Dict[str, List[str]]:
    """Captions JSONL -> ``{file_name: [caption, ...]}`` (file order kept)."""
    out: Dict[str, List[str]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out.setdefault(rec["file_name"], []).append(rec["caption"])
    return out
