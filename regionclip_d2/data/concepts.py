"""The concept pool of region-text pretraining (METHOD.md section 3.1): parse image
captions into concepts, count them, keep the frequent ones.

A *concept* is a noun or a noun phrase of a caption, lower-cased, its head noun
lemmatised to the singular with WordNet:

* tokens come from NLTK's ``word_tokenize`` and are tagged with NLTK's averaged
  perceptron tagger (the caption is lower-cased first: sentence-initial capitals
  otherwise turn common nouns into proper nouns);
* a *noun phrase* is a maximal run of adjectives (``JJ*``) and nouns (``NN*``) that ends
  with a noun (trailing adjectives are dropped): "two red stars" -> ``red star``,
  "traffic lights" -> ``traffic light``. Runs longer than ``max_phrase_words`` words keep
  their last ``max_phrase_words`` words. The head noun (the last word) also counts alone:
  ``star``, ``light``. Only the head noun is lemmatised ("glass doors" -> ``glass door``):
  WordNet's irregular plurals first (men -> ``man``), plural-only nouns kept
  (:data:`KEEP_AS_IS`: ``pants``, ``scissors``, ``glasses``, ...), else ``WordNetLemmatizer``;
* words are letters with optional inner hyphens (``t-shirt``); anything else (numbers,
  punctuation, possessives) ends a run. Head nouns shorter than 2 letters are dropped.

Counting: each concept counts **once per caption** in which it occurs (a caption
"a dog chasing a dog" adds 1 to ``dog``), so a concept's count is the number of captions
mentioning it. :func:`parse_caption` therefore returns distinct concepts.

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
import codecs
import collections
import gzip
import itertools
import json
import logging
import multiprocessing
import os
import re
import threading
import types
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

FORMATS = ("coco", "jsonl", "tsv")
DEFAULT_MAX_CHARS = 1000
DEFAULT_MAX_PHRASE_WORDS = 4
JSON_CHUNK_BYTES = 1 << 20  # read size of the streaming COCO JSON parser (bytes)

NLTK_RESOURCES = {
    "punkt_tab": "tokenizers/punkt_tab/english/",
    "averaged_perceptron_tagger_eng": "taggers/averaged_perceptron_tagger_eng/",
    "wordnet": "corpora/wordnet",
}

# Nouns that WordNet would wrongly "singularise" (pants -> pant) or that are their own plural.
KEEP_AS_IS = frozenset({
    "pants", "shorts", "jeans", "trousers", "tights", "leggings", "sunglasses", "eyeglasses", "goggles",
    "scissors", "pliers", "tongs", "binoculars", "clothes", "species", "series", "news", "glasses",
    "headphones", "earphones", "overalls", "pajamas", "pyjamas", "stairs", "physics",
})
_WORD = re.compile(r"^[a-z]+(?:-[a-z]+)*$")
_ENGLISH_FUNCTION_WORDS = frozenset(
    "a an the of on in at with and or is are was were be to for from by near next over under "
    "his her its their this that these those some two three it he she they there while as up down "
    "out into onto has have who what how".split())


class CaptionFormatError(ValueError):
    """A caption file that cannot be read in the declared or detected format."""


class NLTKDataError(RuntimeError):
    """NLTK data (tokenizer, tagger or WordNet) is not installed."""


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
def _open_binary(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption file {path!r} does not exist: check the path")
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


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
    with _open_binary(path) as f:
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


_NUMBER_CHARS = frozenset("0123456789.eE+-")


class _JsonStream:
    """Incremental reader of one JSON document: walks the top-level object and its arrays
    one element at a time (memory: one element plus a read buffer)."""

    def __init__(self, f, path: str, chunk: int = None):
        self.f, self.path, self.chunk = f, path, chunk or JSON_CHUNK_BYTES
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        self.buf, self.pos, self.eof = "", 0, False
        self.json = json.JSONDecoder()

    def _fill(self, size=None) -> bool:
        if self.eof:
            return False
        raw = self.f.read(size or self.chunk)
        text = self.decoder.decode(raw, final=not raw)
        self.eof = not raw
        self.buf = self.buf[self.pos:] + text
        self.pos = 0
        return bool(raw) or bool(text)

    def peek(self) -> str:
        while True:
            n = len(self.buf)
            while self.pos < n and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < n:
                return self.buf[self.pos]
            if not self._fill():
                return ""

    def expect(self, ch: str):
        got = self.peek()
        if got != ch:
            self.error(f"expected {ch!r}, found {got or 'end of file'!r}")
        self.pos += 1

    def error(self, msg):
        raise CaptionFormatError(f"{self.path!r} is not valid COCO Captions JSON: {msg} (fix or re-export the "
                                 "file; for JSON Lines use format 'jsonl')")

    def value(self):
        self.peek()
        while True:
            try:
                obj, end = self.json.raw_decode(self.buf, self.pos)
                # a number may continue in the next chunk: "12" | "3", and also "0" | ".5" or
                # "1e" | "5", which the decoder reads as 0 or 1 followed by junk
                number = isinstance(obj, (int, float)) and not isinstance(obj, bool)
                if self.eof or (end < len(self.buf) and not (number and self.buf[end] in _NUMBER_CHARS)):
                    self.pos = end
                    return obj
            except json.JSONDecodeError as e:
                if self.eof:
                    self.error(f"{e.msg} (character {e.pos} of the remaining text)")
            except RecursionError:
                self.error("a value is nested too deeply")
            self._fill(max(self.chunk, len(self.buf) - self.pos))  # grow geometrically for big values

    def elements(self):
        """Yield the elements of the array at the current position."""
        self.expect("[")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            yield self.value()
            c = self.peek()
            self.pos += 1
            if c == "]":
                return
            if c != ",":
                self.error(f"expected ',' or ']' in an array, found {c or 'end of file'!r}")

    def array(self, key: str):
        """Yield the elements of the top-level array ``key``; other values are skipped
        element by element. Yields nothing if there is no such key."""
        self.expect("{")
        if self.peek() == "}":
            return
        while True:
            k = self.value()
            if not isinstance(k, str):
                self.error("expected a key string")
            self.expect(":")
            if self.peek() == "[":
                if k == key:
                    yield from self.elements()
                    return
                for _ in self.elements():
                    pass
            else:
                self.value()
            c = self.peek()
            self.pos += 1
            if c == "}":
                return
            if c != ",":
                self.error(f"expected ',' or '}}' after the value of {k!r}, found {c or 'end of file'!r}")


def _json_array(path: str, key: str):
    with _open_binary(path) as f:
        yield from _JsonStream(f, path).array(key)


def _has_key(path: str, key: str) -> bool:
    """Whether the top-level object of a JSON file has ``key`` holding a list (streaming scan)."""
    with _open_binary(path) as f:
        s = _JsonStream(f, path)
        s.expect("{")
        if s.peek() == "}":
            return False
        while True:
            k = s.value()
            s.expect(":")
            if k == key and s.peek() == "[":
                return True
            if s.peek() == "[":
                for _ in s.elements():
                    pass
            else:
                s.value()
            c = s.peek()
            s.pos += 1
            if c != ",":
                return False


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
    with _open_binary(path) as f:
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
    with _open_binary(path) as f:
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


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------
_nlp = types.SimpleNamespace(tagger=None)  # loaded once per process (inherited by forked workers)


def check_nltk_data():
    """Raise :class:`NLTKDataError` naming the download command if NLTK data is missing."""
    import nltk

    missing = []
    for name, res in NLTK_RESOURCES.items():
        try:
            nltk.data.find(res)
        except LookupError:
            missing.append(name)
    if missing:
        raise NLTKDataError(
            f"NLTK data {missing} not found (searched {nltk.data.path[:4]}...): install it with "
            f"`python -m nltk.downloader -d <venv>/nltk_data {' '.join(missing)}` or set NLTK_DATA")


def _tools():
    if _nlp.tagger is None:
        check_nltk_data()
        from nltk.stem import WordNetLemmatizer
        from nltk.tag.perceptron import PerceptronTagger
        from nltk.tokenize import word_tokenize

        _nlp.tagger = PerceptronTagger()
        _nlp.lemmatizer = WordNetLemmatizer()
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        _nlp.exceptions = wordnet._exception_map["n"]  # irregular plurals: men -> man, teeth -> tooth
        _nlp.tokenize = word_tokenize
    return _nlp


def singularize(noun: str) -> str:
    """The singular of a lower-case noun with WordNet (``geese`` -> ``goose``, ``buses`` ->
    ``bus``, ``men`` -> ``man``); pluralia tantum such as ``pants`` or ``scissors`` are kept."""
    if noun in KEEP_AS_IS:
        return noun
    nlp = _tools()
    # WordNet also lists multi-word forms ("comics" -> comic_strip, comic): keep single words
    irregular = [w for w in nlp.exceptions.get(noun, ()) if _WORD.match(w)]
    if irregular:
        return irregular[0]
    lemma = nlp.lemmatizer.lemmatize(noun, "n")
    return lemma if _WORD.match(lemma) else noun


def parse_caption(text: str, max_phrase_words: int = DEFAULT_MAX_PHRASE_WORDS) -> List[str]:
    """The distinct concepts of one caption, in order of first occurrence (a head noun
    before its phrase): ``"Two red stars next to a blue ring."`` ->
    ``["star", "red star", "ring", "blue ring"]``. See the module docstring for the rules."""
    nlp = _tools()
    tokens = nlp.tokenize(" ".join(str(text).lower().split()))
    if not tokens:
        return []
    concepts = {}
    run: List[Tuple[str, str]] = []
    for word, tag in itertools.chain(nlp.tagger.tag(tokens), [("", ".")]):
        if (tag.startswith("NN") or tag.startswith("JJ")) and _WORD.match(word):
            run.append((word, tag))
            continue
        while run and not run[-1][1].startswith("NN"):
            run.pop()  # a phrase ends with a noun
        if run:
            head = singularize(run[-1][0])
            if len(head) >= 2:
                concepts.setdefault(head, None)
                words = [w for w, _ in run[-max_phrase_words:-1]] if max_phrase_words > 1 else []
                if words:
                    concepts.setdefault(" ".join(words + [head]), None)
        run = []
    return list(concepts)


def _count_chunk(args) -> Tuple[collections.Counter, int, int]:
    captions, max_phrase_words = args
    counts, parsed, errors = collections.Counter(), 0, 0
    for cap in captions:
        try:
            counts.update(parse_caption(cap, max_phrase_words))
            parsed += 1
        except Exception as e:  # noqa: BLE001  one odd caption must not stop a multi-hour job
            errors += 1
            if errors <= 3:
                logger.warning("failed to parse caption %r: %s", str(cap)[:100], e)
    return counts, parsed, errors


def _as_text(item) -> str:
    return item[1] if isinstance(item, tuple) else item


def _chunks(items: Iterable, size: int, max_phrase_words: int, gate: threading.Semaphore = None,
            stop: threading.Event = None):
    it = iter(items)
    while True:
        if gate is not None:
            gate.acquire()  # at most a few chunks in flight: the input is never read ahead in full
        if stop is not None and stop.is_set():
            return
        chunk = [_as_text(x) for x in itertools.islice(it, size)]
        if not chunk:
            return
        yield chunk, max_phrase_words


def count_concepts(captions: Iterable, workers: int = 0, progress: bool = True, stats: Dict[str, int] = None,
                   chunk_size: int = 1000, max_phrase_words: int = DEFAULT_MAX_PHRASE_WORDS,
                   total: int = None, mp_context: str = None) -> collections.Counter:
    """Count concepts over a stream of captions (each concept once per caption).

    Args:
        captions: an iterable of caption strings or ``(file_name, caption)`` pairs (e.g.
            :func:`read_captions`); consumed lazily in chunks of ``chunk_size``.
        workers: 0 parses in this process; N > 0 uses a pool of N processes
            (``Pool.imap`` over chunks, at most ``4 * N`` chunks in flight).
        progress: show a tqdm bar (captions).
        stats: a dict updated with ``parsed`` and ``parse_errors``.
        total: the expected number of captions, for the progress bar only.
        mp_context: multiprocessing start method (default ``fork`` where available: the
            workers only run NLTK, and a fork does not re-import the package).
    Returns:
        a :class:`collections.Counter` ``concept -> number of captions mentioning it``.
    """
    from tqdm import tqdm

    _tools()  # fail early (and clearly) without NLTK data
    counts = collections.Counter()
    parsed = errors = 0
    pool = gate = stop = None
    if workers and workers > 0:
        method = mp_context or ("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        pool = multiprocessing.get_context(method).Pool(workers)  # before tqdm starts its thread
    bar = tqdm(total=total, desc="parsing captions", unit="caption", disable=not progress, smoothing=0.1)
    try:
        if pool is None:
            results = map(_count_chunk, _chunks(captions, chunk_size, max_phrase_words))
        else:
            gate, stop = threading.Semaphore(4 * workers), threading.Event()
            results = pool.imap(_count_chunk, _chunks(captions, chunk_size, max_phrase_words, gate, stop))
        for chunk_counts, n, e in results:
            if gate is not None:
                gate.release()
            counts.update(chunk_counts)
            parsed += n
            errors += e
            bar.update(n + e)
    finally:
        bar.close()
        if pool is not None:
            stop.set()  # unblock the pool's task thread (it may wait on the gate) before terminating
            gate.release(4 * workers + 1)
            pool.terminate()
            pool.join()
    if stats is not None:
        stats["parsed"] = stats.get("parsed", 0) + parsed
        stats["parse_errors"] = stats.get("parse_errors", 0) + errors
    if errors:
        logger.warning("%d caption(s) could not be parsed and were skipped", errors)
    return counts


# ---------------------------------------------------------------------------------------------
# the pool
# ---------------------------------------------------------------------------------------------
def filter_concepts(counts: collections.Counter, min_count: int = 100) -> List[Tuple[str, int]]:
    """``(concept, count)`` with ``count >= min_count``, most frequent first (ties by name)."""
    return sorted(((c, n) for c, n in counts.items() if n >= min_count), key=lambda x: (-x[1], x[0]))


def build_concept_pool(paths: Sequence[str], fmt: str = "auto", min_count: int = 100, workers: int = 0,
                       max_captions: int = None, progress: bool = True, max_chars: int = DEFAULT_MAX_CHARS,
                       max_phrase_words: int = DEFAULT_MAX_PHRASE_WORDS
                       ) -> Tuple[List[Tuple[str, int]], collections.Counter, Dict[str, int]]:
    """Read caption files, count concepts and keep those seen in at least ``min_count``
    captions.

    Returns:
        ``(pool, counts, stats)``: the kept ``(concept, count)`` most frequent first, the
        full counter and the reading / parsing statistics.
    """
    if isinstance(paths, str):
        paths = [paths]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"caption file {p!r} does not exist: check the path")
    stats = new_stats()
    caps = itertools.chain.from_iterable(read_captions(p, fmt, stats, max_chars) for p in paths)
    if max_captions:
        caps = itertools.islice(caps, max_captions)
    counts = count_concepts(caps, workers=workers, progress=progress, stats=stats,
                            max_phrase_words=max_phrase_words, total=max_captions)
    return filter_concepts(counts, min_count), counts, stats


def write_concepts(path: str, pool: Sequence[Tuple[str, int]]):
    """Write ``concept<TAB>count`` lines (UTF-8)."""
    with open(path, "w", encoding="utf-8") as f:
        for c, n in pool:
            f.write(f"{c}\t{n}\n")


def read_concepts(path: str) -> List[Tuple[str, int]]:
    """Read a ``concepts.txt`` written by :func:`write_concepts` (a bare name counts 0)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            name, _, n = line.partition("\t")
            out.append((name, int(n) if n.strip() else 0))
    return out
