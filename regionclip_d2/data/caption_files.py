"""Caption files of a pretraining corpus, read streaming (one record in memory at a time).

Caption files (all read streaming, one record in memory at a time):

* ``coco``: COCO Captions JSON ``{"images": [{"id", "file_name", ...}], "annotations":
  [{"image_id", "caption"}, ...]}`` (parsed incrementally, never loaded whole);
* ``jsonl``: JSON Lines, one ``{"file_name": ..., "caption": ...}`` per line (``caption``
  may also be a list of captions);
* ``tsv``: ``image_path<TAB>caption`` per line (an optional header line naming the
  columns, e.g. ``filepath<TAB>title``, is recognised).

Files ending in ``.gz`` are decompressed on the fly. Bad input never stops reading: empty
captions, captions that are not English (mostly non-Latin script, or no English
function word in a long caption), captions over ``max_chars`` characters and malformed
records are skipped; bytes that are not UTF-8 are replaced by U+FFFD (the caption is kept).
Every case is counted in a ``stats`` dict (see :func:`new_stats`) and summarised in the log.
Only a file that is not in the declared format at all (e.g. not a JSON object) raises
:class:`CaptionFormatError`.
"""
import json
import logging
import os
import re
from typing import Dict, Iterator, Optional, Tuple

from .json_stream import CaptionFormatError, _has_key, _json_array, open_binary

logger = logging.getLogger(__name__)

FORMATS = ("coco", "jsonl", "tsv")
DEFAULT_MAX_CHARS = 1000
_ENGLISH_FUNCTION_WORDS = frozenset(
    "a an the of on in at with and or is are was were be to for from by near next over under "
    "his her its their this that these those some two three it he she they there while as up down "
    "out into onto has have who what how".split())


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
STAT_KEYS = ("records", "captions", "empty", "non_english", "too_long", "bad_encoding", "bad_records",
             "unknown_image_id")
STAT_HELP = {
    "records": "caption records read",
    "captions": "captions kept",
    "empty": "empty captions skipped (no letters)",
    "non_english": "non-English captions skipped",
    "too_long": "over-long captions skipped",
    "bad_encoding": "captions with non-UTF-8 bytes (replaced by U+FFFD, kept)",
    "bad_records": "malformed records skipped",
    "unknown_image_id": "COCO captions whose image_id is not in 'images' (kept, file_name None)",
    "parsed": "captions parsed",
    "parse_errors": "captions the parser failed on (skipped)",
}


def new_stats() -> Dict[str, int]:
    """A stats dict with every counter at 0: ``records`` (read), ``captions`` (kept),
    ``empty``, ``non_english``, ``too_long``, ``bad_records`` (skipped), ``bad_encoding``
    (kept, bytes replaced), ``unknown_image_id`` (COCO, kept); :func:`count_concepts`
    adds ``parsed`` and ``parse_errors``."""
    return {k: 0 for k in STAT_KEYS}


class _LiveStats(dict):
    """A reader's own counters that also add every change to ``parent`` as it happens (so
    a caller's totals are right even when it stops reading early)."""

    def __init__(self, parent: Optional[Dict[str, int]]):
        super().__init__(new_stats())
        self.parent = parent
        if parent is not None:
            for k in self:
                parent.setdefault(k, 0)

    def __setitem__(self, key, value):
        if self.parent is not None:
            self.parent[key] = self.parent.get(key, 0) + value - self.get(key, 0)
        super().__setitem__(key, value)


def format_stats(stats: Dict[str, int]) -> str:
    """A one-line human summary of the non-zero counters of a stats dict."""
    parts = [f"{STAT_HELP.get(k, k)}: {v}" for k, v in stats.items() if v]
    return "; ".join(parts) if parts else "nothing read"


def _report(stats: Dict[str, int], source: str):
    bad = {k: stats.get(k, 0) for k in ("empty", "non_english", "too_long", "bad_encoding", "bad_records",
                                        "unknown_image_id")}
    if any(bad.values()):
        logger.warning("%s: %s", source, format_stats(stats))
    else:
        logger.info("%s: %s", source, format_stats(stats))


# ---------------------------------------------------------------------------------------------
# caption cleaning
# ---------------------------------------------------------------------------------------------
def caption_problem(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> Optional[str]:
    """Why a (whitespace-normalised) caption should be skipped: ``"empty"`` (no letters),
    ``"too_long"`` (more than ``max_chars`` characters; ``None`` or 0 = no limit),
    ``"non_english"`` (under half of its letters are ASCII, or 5+ words without a single
    common English function word), else ``None``."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return "empty"
    if max_chars and len(text) > max_chars:
        return "too_long"
    if sum(c.isascii() for c in letters) < 0.5 * len(letters):
        return "non_english"
    words = re.findall(r"[a-z]+", text.lower())
    if len(words) >= 5 and not any(w in _ENGLISH_FUNCTION_WORDS for w in words):
        return "non_english"
    return None


def _clean(caption, stats, max_chars, english_only) -> Optional[str]:
    """Normalise one raw caption and update ``stats``; ``None`` if it is skipped."""
    stats["records"] += 1
    if not isinstance(caption, str):
        stats["bad_records"] += 1
        return None
    text = " ".join(caption.split())
    problem = caption_problem(text, max_chars)
    if problem == "non_english" and not english_only:
        problem = None
    if problem:
        stats[problem] += 1
        return None
    if "\ufffd" in text:
        stats["bad_encoding"] += 1
    stats["captions"] += 1
    return text


# ---------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------
def _decode_line(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n")


def detect_format(path: str) -> str:
    """``coco`` | ``jsonl`` | ``tsv`` from the extension (``.jsonl``/``.ndjson``, ``.tsv``,
    ``.json``), else from the content: a first line that is a whole JSON object with a
    ``caption`` is JSON Lines, a file starting with ``{`` otherwise is COCO, a first line
    with a tab is TSV."""
    name = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(name)[1].lower()
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"
    if ext == ".tsv":
        return "tsv"
    with open_binary(path) as f:
        head = f.read(1 << 16)
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    stripped = text.lstrip()
    if stripped.startswith("{"):
        first = stripped.split("\n", 1)[0].strip()
        try:
            obj = json.loads(first)
            if isinstance(obj, dict) and any(k in obj for k in _CAPTION_KEYS):
                return "jsonl"
        except json.JSONDecodeError:
            pass
        return "coco"
    if ext == ".json":
        raise CaptionFormatError(f"{path!r} is not a JSON object: COCO Captions files look like "
                                 "{\"images\": [...], \"annotations\": [...]}")
    if "\t" in text.split("\n", 1)[0]:
        return "tsv"
    raise CaptionFormatError(
        f"cannot detect the caption format of {path!r} (extension {ext or 'none'!r}): name it .json (COCO "
        "Captions), .jsonl (JSON Lines with file_name and caption) or .tsv (image_path<TAB>caption), "
        "or give the format explicitly (fmt= / --format)")


def _records_coco(path, stats, max_chars, english_only):
    images = {}
    for img in _json_array(path, "images"):
        if isinstance(img, dict) and "id" in img and _hashable(img["id"]) and "file_name" in img:
            images[img["id"]] = {k: img[k] for k in ("file_name", "height", "width") if k in img}
            images[img["id"]]["file_name"] = _file_name(img["file_name"])
    found = False
    for ann in _json_array(path, "annotations"):
        found = True
        if not isinstance(ann, dict) or "caption" not in ann:
            stats["records"] += 1
            stats["bad_records"] += 1
            continue
        text = _clean(ann["caption"], stats, max_chars, english_only)
        if text is None:
            continue
        img = images.get(ann.get("image_id")) if _hashable(ann.get("image_id")) else None
        if img is None:
            stats["unknown_image_id"] += 1
            img = {"file_name": None}
        yield dict(img, image_id=ann.get("image_id"), caption=text)
    if not found and not _has_key(path, "annotations"):
        raise CaptionFormatError(f"{path!r} has no 'annotations' list: a COCO Captions file is "
                                 "{\"images\": [...], \"annotations\": [{\"image_id\", \"caption\"}]} "
                                 "(for JSON Lines use format 'jsonl', for TSV 'tsv')")


_FILE_KEYS = ("file_name", "image", "image_path", "filepath", "file", "path")


def _hashable(v) -> bool:
    """A JSON value usable as an image id (not a list or an object)."""
    return not isinstance(v, (list, dict))


def _file_name(v) -> Optional[str]:
    """A file name as written, ``None`` when it is not a (non-empty) string."""
    return v if isinstance(v, str) and v else None
_CAPTION_KEYS = ("caption", "captions", "text", "title")


def _records_jsonl(path, stats, max_chars, english_only):
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode_line(raw).strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                obj, err = None, e.msg
            except RecursionError:
                obj, err = None, "nested too deeply"
            else:
                err = "not a JSON object with a caption"
            key = next((k for k in _CAPTION_KEYS if isinstance(obj, dict) and k in obj), None)
            if key is None:
                stats["records"] += 1
                stats["bad_records"] += 1
                if stats["bad_records"] <= 5:
                    logger.warning("%s line %d skipped: %s", path, lineno, err)
                continue
            file_name = _file_name(next((obj[k] for k in _FILE_KEYS if k in obj), None))
            caps = obj[key] if isinstance(obj[key], list) else [obj[key]]
            for cap in caps:
                text = _clean(cap, stats, max_chars, english_only)
                if text is not None:
                    rec = {"file_name": file_name, "caption": text}
                    for k in ("image_id", "height", "width"):
                        if k in obj:
                            rec[k] = obj[k]
                    yield rec


def _records_tsv(path, stats, max_chars, english_only):
    file_col, cap_col = 0, 1
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode_line(raw)
            if not line.strip():
                continue
            fields = line.split("\t")
            if lineno == 1:
                names = [x.strip().lower() for x in fields]
                fcol = next((names.index(k) for k in _FILE_KEYS + ("url",) if k in names), None)
                ccol = next((names.index(k) for k in _CAPTION_KEYS if k in names), None)
                if fcol is not None and ccol is not None:
                    file_col, cap_col = fcol, ccol
                    continue
            if len(fields) < 2:
                stats["records"] += 1
                stats["bad_records"] += 1
                if stats["bad_records"] <= 5:
                    logger.warning("%s line %d skipped: expected image_path<TAB>caption", path, lineno)
                continue
            if (file_col, cap_col) == (0, 1):
                file_name, caption = fields[0], "\t".join(fields[1:])  # a caption may hold tabs
            else:
                file_name = fields[file_col] if file_col < len(fields) else None
                caption = fields[cap_col] if cap_col < len(fields) else None
            text = _clean(caption, stats, max_chars, english_only)
            if text is not None:
                file_name = file_name.strip() if file_name else ""
                yield {"file_name": file_name or None, "caption": text}


_READERS = {"coco": _records_coco, "jsonl": _records_jsonl, "tsv": _records_tsv}


def iter_caption_records(path: str, fmt: str = "auto", stats: Dict[str, int] = None,
                         max_chars: int = DEFAULT_MAX_CHARS, english_only: bool = True) -> Iterator[dict]:
    """Stream the captions of one file as dicts ``{"file_name": str | None, "caption": str}``
    (plus ``image_id`` / ``height`` / ``width`` where the file has them), one per caption.

    Args:
        path: a COCO Captions ``.json``, a ``.jsonl`` or a ``.tsv`` file (optionally ``.gz``).
        fmt: ``auto`` | ``coco`` | ``jsonl`` | ``tsv``.
        stats: a dict (see :func:`new_stats`) updated in place with what was read and skipped.
        max_chars: longer captions are skipped (``None`` / 0: no limit).
        english_only: skip captions detected as non-English.
    """
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in _READERS:
        raise CaptionFormatError(f"unknown caption format {fmt!r}: use one of auto, {', '.join(FORMATS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption file {path!r} does not exist: check the path")
    own = _LiveStats(stats)
    try:
        yield from _READERS[fmt](path, own, max_chars, english_only)
    finally:
        _report(own, f"{path} ({fmt})")


def read_captions(path: str, fmt: str = "auto", stats: Dict[str, int] = None,
                  max_chars: int = DEFAULT_MAX_CHARS, english_only: bool = True) -> Iterator[Tuple[Optional[str], str]]:
    """Stream ``(file_name, caption)`` pairs from a caption file (see
    :func:`iter_caption_records` for the arguments). ``file_name`` is as written in the
    file (relative to the image folder), ``None`` where unknown (missing, empty or not a
    string); captions are whitespace-
    normalised, bad ones skipped and counted in ``stats``."""
    for rec in iter_caption_records(path, fmt, stats, max_chars, english_only):
        yield rec["file_name"], rec["caption"]


