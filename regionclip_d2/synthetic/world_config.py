"""The parameters of a synthetic world: ``WorldConfig`` (defaults, validation, fingerprint)
and ``WorldConfigError``, with the format and render versions a fingerprint depends on."""
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .shapes import COLORS, DEFAULT_CATEGORIES, DEFAULT_NOVEL, SHAPES

WORLD_FORMAT_VERSION = 1
RENDER_REVISION = 1  # bump when drawing or caption code changes what a seed produces


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
        max_rotation: objects are rotated by an angle drawn uniformly from
            ``[-max_rotation, max_rotation]`` degrees (180: any orientation). Small values keep
            shapes near upright, as objects in photos mostly are.
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
    max_rotation: float = 180.0
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
        if not 0.0 <= self.max_rotation <= 180.0:
            raise WorldConfigError(f"max_rotation={self.max_rotation} degrees must lie in [0, 180] "
                                   "(180: any orientation)")
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
