"""Exact character <-> token alignment for CLIP's BPE tokenizer (open_clip ``SimpleTokenizer``).

The tokenizer cleans a text before it splits it (ftfy, HTML unescaping twice, whitespace
collapsed, lower-cased), so the characters of its tokens are not the characters of the text
as written. :func:`tokenize_with_offsets` redoes the tokenizer's steps while keeping, for
every BPE token, the ``[start, end)`` range of characters of the *original* text it comes
from:

1. the text is cleaned word by word (whitespace-separated), each cleaned word aligned to its
   source characters (:mod:`regionclip_d2.data.text_offsets`: one to one where the cleaning
   works character by character, as lower-casing does; ``difflib`` otherwise, e.g. for HTML
   entities), and the words joined by single spaces; this must equal the tokenizer's own
   cleaning of the whole text (it does unless ftfy repairs something across words, which
   raises :class:`TokenAlignmentError`);
2. the tokenizer's pre-tokenisation pattern splits the cleaned text into pieces (none crosses
   a space), each piece's UTF-8 bytes go through the tokenizer's own BPE, and each BPE token's
   bytes are mapped back to the piece's characters;
3. the resulting ids are checked against ``tokenizer.encode(text)``.

Token *positions* are those of the text tower: start-of-text at 0, BPE token ``i`` at
``i + 1``, end-of-text right after the last BPE token.
"""
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from ..data.text_offsets import transform_words

Span = Tuple[int, int]
_REQUIRED = ("clean_fn", "pat", "byte_encoder", "bpe", "encoder", "encode", "sot_token_id", "eot_token_id")


class TokenAlignmentError(ValueError):
    """A text whose tokens cannot be aligned exactly to its characters."""


class PromptTooLongError(ValueError):
    """A text longer than the text tower's context (it is never truncated silently)."""


@dataclass(frozen=True)
class TokenizedText:
    """A text, its BPE token ids and each token's character span in the text.

    Attributes:
        text: the text as given.
        ids: BPE token ids, without start- and end-of-text.
        char_spans: ``[start, end)`` of ``text`` each id comes from (several ids may share
            characters: a character split over two BPE tokens, or ``İ`` lower-cased to two).
        sot_id, eot_id: the tokenizer's start- and end-of-text ids.
    """

    text: str
    ids: Tuple[int, ...]
    char_spans: Tuple[Span, ...]
    sot_id: int
    eot_id: int

    @property
    def num_positions(self) -> int:
        """Positions the text tower computes: start-of-text, the tokens, end-of-text."""
        return len(self.ids) + 2

    def check_fits(self, context_length: int, what: str = "text"):
        if self.num_positions > context_length:
            raise PromptTooLongError(
                f"{what} {self.text[:80]!r}{'...' if len(self.text) > 80 else ''} needs {self.num_positions} "
                f"token positions (with start- and end-of-text) but the text tower's context is {context_length}: "
                "split it (a class prompt is chunked automatically) or use a tower with a longer context")

    def tower_ids(self, context_length: int) -> torch.Tensor:
        """``[context_length]`` ids as the tokenizer's ``__call__`` gives them (start-of-text,
        tokens, end-of-text, zeros); raises :class:`PromptTooLongError` instead of truncating."""
        self.check_fits(context_length)
        out = torch.zeros(context_length, dtype=torch.long)
        out[: self.num_positions] = torch.tensor([self.sot_id, *self.ids, self.eot_id], dtype=torch.long)
        return out

    def token_span(self, start: int, end: int) -> Span:
        """Token positions ``[first, last + 1)`` (start-of-text at 0) of the tokens that share
        at least one character with ``text[start:end]``."""
        if not 0 <= start < end <= len(self.text):
            raise ValueError(f"character span [{start}, {end}) is not a non-empty span of the {len(self.text)} "
                             f"characters of {self.text[:80]!r}")
        hit = [i for i, (a, b) in enumerate(self.char_spans) if a < end and b > start]
        if not hit:
            raise TokenAlignmentError(f"character span [{start}, {end}) = {self.text[start:end]!r} of "
                                      f"{self.text[:80]!r} covers no token (whitespace, or characters the "
                                      "tokenizer's cleaning removes)")
        return hit[0] + 1, hit[-1] + 2


def check_tokenizer(tokenizer):
    missing = [a for a in _REQUIRED if not hasattr(tokenizer, a)]
    if missing:
        raise TypeError(f"{type(tokenizer).__name__} lacks {missing}: token spans need open_clip's CLIP BPE "
                        "SimpleTokenizer (regionclip_d2.modeling.text.encoder.tokenizer_for_config)")
    if getattr(tokenizer, "reduction_fn", None) is not None:
        raise TypeError("a tokenizer with a reduction mask (random or syntax-based token dropping) gives no fixed "
                        "token positions: use one without reduction_mask")


def _piece_char_spans(tokenizer, piece: str) -> Tuple[List[int], List[Span]]:
    """BPE ids of one pre-tokenised piece and each id's ``[start, end)`` characters in the piece."""
    data = piece.encode("utf-8")
    char_of_byte = [i for i, ch in enumerate(piece) for _ in ch.encode("utf-8")]
    mapped = "".join(tokenizer.byte_encoder[b] for b in data)
    ids, spans, pos = [], [], 0
    for sub in tokenizer.bpe(mapped).split(" "):
        n = len(sub[:-4] if sub.endswith("</w>") else sub)  # one byte per symbol
        ids.append(tokenizer.encoder[sub])
        spans.append((char_of_byte[pos], char_of_byte[pos + n - 1] + 1))
        pos += n
    if pos != len(data):
        raise TokenAlignmentError(f"BPE tokens of {piece!r} cover {pos} of its {len(data)} bytes")
    return ids, spans


def tokenize_with_offsets(tokenizer, text: str) -> TokenizedText:
    """Tokenize ``text`` as ``tokenizer`` does and keep each token's character span in ``text``
    (see the module docstring). Raises :class:`TokenAlignmentError` if that is impossible."""
    check_tokenizer(tokenizer)
    text = str(text)
    cleaned, sources = transform_words(text, tokenizer.clean_fn)
    if cleaned != tokenizer.clean_fn(text):
        raise TokenAlignmentError(
            f"the tokenizer cleans {text[:100]!r} differently word by word than as a whole (ftfy repaired text "
            "across words): clean the text first, e.g. with ftfy.fix_text, and give spans into the cleaned text")
    ids: List[int] = []
    spans: List[Span] = []
    for m in tokenizer.pat.finditer(cleaned):
        piece_ids, piece_spans = _piece_char_spans(tokenizer, m.group())
        for a, b in piece_spans:
            src = [sources[k] for k in range(m.start() + a, m.start() + b) if sources[k][1] > sources[k][0]]
            spans.append((min(s[0] for s in src), max(s[1] for s in src)))
        ids.extend(piece_ids)
    if ids != list(tokenizer.encode(text)):
        raise TokenAlignmentError(f"re-tokenizing {text[:100]!r} with offsets gave other ids than the tokenizer")
    return TokenizedText(text, tuple(ids), tuple(spans), int(tokenizer.sot_token_id), int(tokenizer.eot_token_id))


def token_spans(tokenized: TokenizedText, char_spans: Sequence[Span]) -> List[Span]:
    """:meth:`TokenizedText.token_span` of each character span."""
    return [tokenized.token_span(int(a), int(b)) for a, b in char_spans]
