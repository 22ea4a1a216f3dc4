"""Data of the world CLIP: a split's image-caption pairs, its single-object images with
their shape names, and the preprocessing of the detector's recognition branch (RGB, /255,
CLIP mean / std)."""
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..config import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD
from .world import read_captions, world_paths


def load_images(paths: Sequence[str], progress: bool = False) -> torch.Tensor:
    """PNG/JPEG files (all of one size) -> uint8 RGB ``[N, 3, H, W]``."""
    it = paths
    if progress:
        from tqdm import tqdm

        it = tqdm(paths, desc="loading images", unit="img")
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in it]
    if not arrays:
        raise ValueError("no images to load")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {sorted(shapes)[:4]}: a world's images share one size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_split_pairs(world_dir: str, split: str = "train", max_images: Optional[int] = None,
                     progress: bool = False) -> Tuple[torch.Tensor, List[List[str]], List[str]]:
    """A split's image-caption pairs.

    Returns:
        images: uint8 RGB ``[N, 3, S, S]``.
        captions: ``N`` lists of captions (>= 1 each).
        file_names: ``N`` image file names (relative to the split's image folder).
    """
    paths = world_paths(world_dir, split)
    if not os.path.isfile(paths["captions"]):
        raise FileNotFoundError(f"captions file {paths['captions']} does not exist: generate the world with "
                                "tools/make_synthetic_ovd.py")
    caps = read_captions(paths["captions"])
    names = sorted(caps)[:max_images] if max_images else sorted(caps)
    if not names:
        raise ValueError(f"{paths['captions']} holds no captions: the {split} split is empty")
    images = load_images([os.path.join(paths["images"], n) for n in names], progress=progress)
    return images, [caps[n] for n in names], names


def single_object_images(world_dir: str, split: str = "val", max_images: Optional[int] = None
                         ) -> Tuple[torch.Tensor, List[str]]:
    """Images with exactly one object (from the COCO JSON of a split with all boxes, i.e.
    val or test) and their shape names: (uint8 ``[N, 3, S, S]``, ``N`` names)."""
    paths = world_paths(world_dir, split)
    with open(paths["instances"]) as f:
        coco = json.load(f)
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    per_image: Dict[int, List[int]] = {}
    for a in coco["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a["category_id"])
    chosen = [(im["file_name"], cats[per_image[im["id"]][0]]) for im in coco["images"]
              if len(per_image.get(im["id"], [])) == 1]
    if max_images:
        chosen = chosen[:max_images]
    if not chosen:
        raise ValueError(f"{paths['instances']} has no single-object image")
    images = load_images([os.path.join(paths["images"], n) for n, _ in chosen])
    return images, [c for _, c in chosen]


def preprocess(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 RGB ``[N, 3, H, W]`` -> float32 ``[N, 3, H, W]``: /255, minus CLIP mean, over CLIP std
    (the detector's recognition-branch normalisation)."""
    x = images.float().div_(255.0)
    mean = torch.tensor(CLIP_PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_PIXEL_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
