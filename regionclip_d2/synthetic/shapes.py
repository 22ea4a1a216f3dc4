"""The drawable shapes of the synthetic world and the object colours.

Each shape is a list of (polygon ``[K, 2]`` in unit coordinates, fill) drawn in order on a
mask (``SHAPES``); also the default base / novel category split and the 8 colours
(``COLORS``). Only numpy is used.
"""
import math
from typing import Dict, Tuple

import numpy as np

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

DEFAULT_BASE = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "pentagon", "arrow",
                "frame")
DEFAULT_NOVEL = ("heart", "hexagon", "moon", "bolt")
DEFAULT_CATEGORIES = DEFAULT_BASE + DEFAULT_NOVEL

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (240, 215, 35), "green": (35, 165, 55),
    "blue": (35, 75, 220), "purple": (135, 50, 185), "white": (245, 245, 245), "black": (20, 20, 20),
}
"""The 8 object colours (name -> RGB 0..255); each object is jittered by up to +-18 per channel."""
