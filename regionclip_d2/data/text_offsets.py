"""Character offsets through text normalisation: which characters of the original text each
character of a cleaned text (lower-cased, whitespace collapsed, ftfy-fixed, ...) came from.

Used by the caption parser (:func:`regionclip_d2.data.concepts.noun_phrase_spans`) and the
CLIP token alignment (:mod:`regionclip_d2.grounding.tokens`) to give spans in the caption
the user wrote, not in its cleaned form.
"""
import difflib
from typing import Callable, List, Tuple

Span = Tuple[int, int]


def words(text: str) -> List[Span]:
    """``[start, end)`` of each maximal run of non-whitespace characters (the words of
    ``str.split()``, which splits on the characters for which ``str.isspace`` holds)."""
    out, start = [], None
    for i, ch in enumerate(text):
        if ch.isspace():
            if start is not None:
                out.append((start, i))
                start = None
        elif start is None:
            start = i
    if start is not None:
        out.append((start, len(text)))
    return out


def align_piece(src: str, out: str, fn: Callable[[str], str]) -> List[Span]:
    """For each character of ``out`` (= ``fn(src)``), the ``[start, end)`` range of ``src``
    characters it comes from.

    Exact when ``fn`` works character by character (``fn(src)`` equals the concatenation of
    ``fn`` of each character: lower-casing, ftfy's quote, ligature and width fixes); otherwise
    (HTML entities, mojibake repair) the two are aligned with ``difflib``: unchanged runs map
    one to one and each replaced run maps to the whole source run it replaces.
    """
    if out == src:
        return [(i, i + 1) for i in range(len(src))]
    parts = [fn(ch) for ch in src]
    if "".join(parts) == out:
        return [(i, i + 1) for i, p in enumerate(parts) for _ in p]
    if not out:
        return []
    joined = "".join(parts)
    origin = [i for i, p in enumerate(parts) for _ in p]  # source character of each joined character
    if not joined:
        return [(0, len(src))] * len(out)
    result: List[Span] = [None] * len(out)
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, joined, out, autojunk=False).get_opcodes():
        if tag == "equal":
            for k in range(j2 - j1):
                result[j1 + k] = (origin[i1 + k], origin[i1 + k] + 1)
        elif tag in ("replace", "insert"):
            if i2 > i1:
                span = (origin[i1], origin[i2 - 1] + 1)
            else:  # inserted characters: attach to the source character before (or after) them
                k = origin[i1 - 1] if i1 > 0 else origin[min(i1, len(origin) - 1)]
                span = (k, k + 1)
            for j in range(j1, j2):
                result[j] = span
    return result


def transform_words(text: str, fn: Callable[[str], str]) -> Tuple[str, List[Span]]:
    """Apply ``fn`` to each word of ``text`` (see :func:`words`), join the non-empty results
    with single spaces, and return the joined text with, for each of its characters, the
    ``[start, end)`` range of ``text`` it comes from (a joining space: the empty range at the
    start of the next word).

    ``transform_words(t, str.lower)[0] == " ".join(t.lower().split())``.
    """
    out_parts: List[str] = []
    spans: List[Span] = []
    for start, end in words(text):
        w = fn(text[start:end])
        if not w:
            continue
        if out_parts:
            spans.append((start, start))
        out_parts.append(w)
        spans.extend((start + a, start + b) for a, b in align_piece(text[start:end], w, fn))
    return " ".join(out_parts), spans


def source_span(spans: List[Span], start: int, end: int) -> Span:
    """The range of original characters that characters ``[start, end)`` of a transformed
    text (with ``spans`` from :func:`transform_words`) come from."""
    if not 0 <= start < end <= len(spans):
        raise ValueError(f"span [{start}, {end}) is not a non-empty range of the {len(spans)} characters")
    covered = [s for s in spans[start:end] if s[1] > s[0]]
    if not covered:
        raise ValueError(f"span [{start}, {end}) covers only joining spaces")
    return min(s[0] for s in covered), max(s[1] for s in covered)
