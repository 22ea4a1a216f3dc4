"""The concept pool of region-text pretraining (docs/method.md, "Pretraining"): parse image
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

:func:`noun_phrase_spans` gives the same phrases with their character spans in the caption as
written, every occurrence (for phrase grounding). Caption files are read by
:mod:`regionclip_d2.data.caption_files`.
"""
import collections
import itertools
import logging
import multiprocessing
import os
import re
import threading
import types
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

# the caption-file readers, re-exported: they were part of this module
from .caption_files import (  # noqa: F401
    DEFAULT_MAX_CHARS,
    FORMATS,
    caption_problem,
    detect_format,
    format_stats,
    iter_caption_records,
    new_stats,
    read_captions,
)
from .json_stream import JSON_CHUNK_BYTES, CaptionFormatError  # noqa: F401

logger = logging.getLogger(__name__)

DEFAULT_MAX_PHRASE_WORDS = 4

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


class NLTKDataError(RuntimeError):
    """NLTK data (tokenizer, tagger or WordNet) is not installed."""


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


def _phrase_runs(tokens: Sequence[str], max_phrase_words: int):
    """The noun phrases of tagged ``tokens`` (see the module docstring): yields
    ``(run, head)``, ``run`` the kept ``(token index, word)`` pairs (at most
    ``max_phrase_words``, ending with the head noun) and ``head`` the lemmatised head noun."""
    nlp = _tools()
    run: List[Tuple[int, str, str]] = []
    for index, (word, tag) in enumerate(itertools.chain(nlp.tagger.tag(list(tokens)), [("", ".")])):
        if (tag.startswith("NN") or tag.startswith("JJ")) and _WORD.match(word):
            run.append((index, word, tag))
            continue
        while run and not run[-1][2].startswith("NN"):
            run.pop()  # a phrase ends with a noun
        if run:
            head = singularize(run[-1][1])
            if len(head) >= 2:
                kept = run[-max_phrase_words:] if max_phrase_words > 1 else run[-1:]
                yield [(i, w) for i, w, _ in kept], head
        run = []


def _normalize(text) -> str:
    return " ".join(str(text).lower().split())


def parse_caption(text: str, max_phrase_words: int = DEFAULT_MAX_PHRASE_WORDS) -> List[str]:
    """The distinct concepts of one caption, in order of first occurrence (a head noun
    before its phrase): ``"Two red stars next to a blue ring."`` ->
    ``["star", "red star", "ring", "blue ring"]``. See the module docstring for the rules."""
    nlp = _tools()
    tokens = nlp.tokenize(_normalize(text))
    if not tokens:
        return []
    concepts = {}
    for run, head in _phrase_runs(tokens, max_phrase_words):
        concepts.setdefault(head, None)
        if len(run) > 1:
            concepts.setdefault(" ".join([w for _, w in run[:-1]] + [head]), None)
    return list(concepts)


class NounPhrase(NamedTuple):
    """A noun phrase of a caption: ``caption[start:end] == text``; ``concept`` is what
    :func:`parse_caption` counts for it (head noun lemmatised), ``head`` the lemmatised head."""
    start: int
    end: int
    text: str
    concept: str
    head: str


def _token_offsets(tokens: Sequence[str], text: str) -> List[Optional[Tuple[int, int]]]:
    """Where each of NLTK's ``word_tokenize`` tokens lies in ``text`` (``None`` where the
    tokenizer rewrote it beyond recognition). Its tokens are substrings of the text in order,
    except double quotes (NLTK writes them as two backquotes or two single quotes)."""
    out, cursor = [], 0
    for tok in tokens:
        candidates = [tok] + (['"'] if tok in ("``", "''") else [])
        found = None
        for c in candidates:
            k = text.find(c, cursor)
            if k >= 0 and (found is None or k < found[0]):
                found = (k, k + len(c))
        if found is not None:
            cursor = found[1]
        out.append(found)
    return out


def noun_phrase_spans(text: str, max_phrase_words: int = DEFAULT_MAX_PHRASE_WORDS) -> List[NounPhrase]:
    """Every noun phrase of a caption with its character span in ``text`` as given (not
    lower-cased, whitespace as written), in order and not deduplicated: ``"A dog chasing a
    big Dog"`` -> ``[NounPhrase(2, 5, "dog", "dog", "dog"), NounPhrase(16, 23, "big Dog", "big
    dog", "dog")]``. The phrases are those :func:`parse_caption` finds (same tokenizer, tagger
    and rules: adjectives and nouns, at most ``max_phrase_words`` words, determiners and
    numbers not included)."""
    from .text_offsets import source_span, transform_words

    nlp = _tools()
    normalized, spans = transform_words(str(text), str.lower)
    if normalized != _normalize(text):  # cannot happen: str.lower never adds nor removes whitespace
        raise AssertionError(f"lower-casing {str(text)[:100]!r} word by word changed the text")
    tokens = nlp.tokenize(normalized)
    if not tokens:
        return []
    offsets = _token_offsets(tokens, normalized)
    out = []
    for run, head in _phrase_runs(tokens, max_phrase_words):
        first, last = offsets[run[0][0]], offsets[run[-1][0]]
        if first is None or last is None:  # a word (letters and hyphens) is never rewritten
            logger.warning("could not locate the phrase %r in %r", " ".join(w for _, w in run), str(text)[:200])
            continue
        start, end = source_span(spans, first[0], last[1])
        concept = " ".join([w for _, w in run[:-1]] + [head])
        out.append(NounPhrase(start, end, str(text)[start:end], concept, head))
    return out


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

