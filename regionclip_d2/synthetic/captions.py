"""Template captions of a synthetic-world image: counts, colours, sizes and spatial
relations of some of its objects (``make_caption``), and which objects each phrase names
(``make_grounded_caption``, for grounding annotations)."""
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np

from .rendering import DrawnObject
from .world_config import WorldConfig

PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "cross": "crosses", "ring": "rings", "diamond": "diamonds", "pentagon": "pentagons",
           "arrow": "arrows", "frame": "frames", "ellipse": "ellipses", "heart": "hearts",
           "hexagon": "hexagons", "moon": "moons", "bolt": "bolts"}

_NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
            9: "nine", 10: "ten"}
_PREFIXES = ("a photo of", "an image of", "a picture of", "a drawing of", "a rendering of", "there is")
_SUFFIXES = ("on a textured background", "on a noisy background", "in the picture", "in the scene")


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


class GroundedPhrase(NamedTuple):
    """A phrase of a caption and the objects it names: ``caption[start:end]`` (e.g. ``"two
    red stars"``, with its count word or article) names ``objects[i]`` for ``i in members``."""
    start: int
    end: int
    members: Tuple[int, ...]


def make_caption(objects: Sequence[DrawnObject], cfg: WorldConfig, rng: np.random.Generator) -> str:
    """A template caption of some of ``objects``: counts, colours (with ``colour_prob``),
    size words, a spatial relation between two groups, optional prefix / suffix. At most
    three groups are named (short enough for a 24-token text context)."""
    return make_grounded_caption(objects, cfg, rng)[0]


def make_grounded_caption(objects: Sequence[DrawnObject], cfg: WorldConfig, rng: np.random.Generator
                          ) -> Tuple[str, List[GroundedPhrase]]:
    """:func:`make_caption` (the same caption, from the same random draws) and the phrases
    it is made of, each with the indices (into ``objects``) of the objects it names."""
    if not objects:
        return "an empty textured background", []
    use_colour = rng.random() < cfg.colour_prob
    groups: Dict[tuple, List[int]] = {}
    for i, o in enumerate(objects):
        groups.setdefault((o.color, o.shape) if use_colour else (o.shape,), []).append(i)
    keys = list(groups)
    order = rng.permutation(len(keys))
    keys = [keys[i] for i in order]
    if len(keys) > 1 and rng.random() < cfg.partial_prob:
        keys = keys[:int(rng.integers(1, len(keys)))]
    keys = keys[:3]
    span = max(cfg.max_size - cfg.min_size, 1e-6)
    phrases, centres = [], []
    for key in keys:
        members = [objects[i] for i in groups[key]]
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
    # the caption as pieces: (text, index of the group it names, or None for the glue)
    if len(phrases) == 2 and rng.random() < 0.5:
        pieces = [(phrases[0], 0), (f" {_relation(centres[0], centres[1], rng)} ", None), (phrases[1], 1)]
    elif len(phrases) == 1:
        pieces = [(phrases[0], 0)]
    else:
        pieces = [(phrases[0], 0)]
        for k in range(1, len(phrases)):
            pieces += [(", " if k < len(phrases) - 1 else " and ", None), (phrases[k], k)]
    r = rng.random()
    if r < 0.45:
        prefix = _PREFIXES[int(rng.integers(len(_PREFIXES)))]
        if prefix == "there is" and not phrases[0].startswith(("a ", "an ")):
            prefix = "there are"
        pieces.insert(0, (f"{prefix} ", None))
    elif r < 0.55 and len(phrases) <= 2:
        pieces.append((f" {_SUFFIXES[int(rng.integers(len(_SUFFIXES)))]}", None))
    caption, grounded = "", []
    for text, k in pieces:
        if k is not None:
            grounded.append(GroundedPhrase(len(caption), len(caption) + len(text), tuple(groups[keys[k]])))
        caption += text
    return caption, grounded
