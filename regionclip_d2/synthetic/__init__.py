"""A synthetic open-vocabulary world that runs the whole RegionCLIP method on CPU in minutes.

``world``: seeded generator of shape images with COCO boxes (base classes only in train)
and template captions (naming base and novel shapes), written to and read from disk; its
parts are ``shapes`` (geometry, colours, default categories), ``world_config``
(``WorldConfig``), ``rendering`` (``render_image``) and ``captions`` (``make_caption``).
``clip_training``: a small CLIP trained from scratch on the world's image-caption pairs,
with ``clip_data`` (loading, preprocessing) and ``clip_eval`` (retrieval, zero-shot
accuracy) (all three imported lazily: they need torch).
"""
from .captions import make_caption
from .rendering import DrawnObject, render_image
from .shapes import COLORS, DEFAULT_BASE, DEFAULT_CATEGORIES, DEFAULT_NOVEL, SHAPES
from .world import (
                    SPLITS,
                    check_same_world,
                    generate_sample,
                    generate_split,
                    generate_world,
                    load_world,
                    read_captions,
                    world_paths,
)
from .world_config import WorldConfig, WorldConfigError
