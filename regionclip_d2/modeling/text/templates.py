"""Prompt templates for embedding class names.

``imagenet80`` is CLIP's 80-template ImageNet ensemble (as shipped by open_clip),
which RegionCLIP uses for class and concept embeddings; ``single`` is one template.
"""
from typing import List


def get_templates(name: str) -> List[str]:
    """Template strings with one ``{}`` each."""
    if name == "imagenet80":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    if name == "single":
        return ["a photo of a {}."]
    if name == "none":
        return ["{}"]
    if "{}" in name:
        return [name]
    raise ValueError(f"unknown prompt templates {name!r}: use 'imagenet80', 'single', 'none' "
                     "or one template string containing '{}'")
