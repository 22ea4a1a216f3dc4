"""A synthetic open-vocabulary world that runs the whole RegionCLIP method on CPU in minutes.

``world``: seeded generator of shape images with COCO boxes (base classes only in train)
and template captions (naming base and novel shapes). ``clip_training``: a small CLIP
trained from scratch on the world's image-caption pairs (imported lazily: it needs torch).
"""
from .world import (
                    COLORS,
                    DEFAULT_BASE,
                    DEFAULT_CATEGORIES,
                    DEFAULT_NOVEL,
                    SHAPES,
                    SPLITS,
                    DrawnObject,
                    WorldConfig,
                    WorldConfigError,
                    check_same_world,
                    generate_sample,
                    generate_split,
                    generate_world,
                    load_world,
                    make_caption,
                    read_captions,
                    render_image,
                    world_paths,
)
