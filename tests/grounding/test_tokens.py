"""Character <-> CLIP token alignment: the ids are the tokenizer's, and every span maps to the
token positions an independent incremental tokenization gives, on tricky inputs."""
import open_clip
import pytest
import torch

from regionclip_d2.data.text_offsets import align_piece, transform_words, words
from regionclip_d2.grounding.tokens import (
    PromptTooLongError,
    TokenAlignmentError,
    tokenize_with_offsets,
)

TRICKY = [
    "two red stars next to a blue ring",
    "Hello  World!! (a test), ok?",           # upper case, double space, punctuation runs
    "dog dog dog. Dog, DOG!",                  # repeated words
    "  leading\tand trailing\n whitespace  ",  # tabs, newlines, leading / trailing spaces
    "a café near the ÉCOLE with naïve art",    # accents: BPE splits them into byte tokens
    "İstanbul's ΟΔΟΣ street",                  # lower-casing changes length / final sigma
    "it’s a ﬁsh in Ｍug",                       # ftfy: curly quote, ligature, full width
    "salt&amp;pepper and a\u00a0b",            # HTML entity, no-break space
    "🙂 emoji, 中文 text, t-shirt",             # 4-byte characters, CJK, hyphen
    "x",
]


@pytest.fixture(scope="module")
def tok():
    return open_clip.SimpleTokenizer()  # context 77


def _boundaries(text):
    """Character positions where a span may start or end: word edges (whitespace-separated)."""
    out = set()
    for a, b in words(text):
        out.update((a, b))
    return sorted(out)


@pytest.mark.parametrize("text", TRICKY)
def test_ids_equal_the_tokenizer_and_spans_equal_incremental_tokenization(tok, text):
    t = tokenize_with_offsets(tok, text)
    assert list(t.ids) == tok.encode(text)
    assert torch.equal(t.tower_ids(77), tok([text])[0])
    assert t.num_positions == len(t.ids) + 2
    assert len(t.char_spans) == len(t.ids) and all(0 <= a < b <= len(text) for a, b in t.char_spans)
    # independent oracle: a span between word edges covers the tokens of text[:end] after those
    # of text[:start] (tokenizing the prefixes, start-of-text at position 0)
    edges = _boundaries(text)
    for i, s in enumerate(edges):
        for e in edges[i + 1:]:
            if not text[s:e].strip():
                continue
            expected = (len(tok.encode(text[:s])) + 1, len(tok.encode(text[:e])) + 1)
            assert t.token_span(s, e) == expected, (text[s:e], expected)


def test_examples_by_hand(tok):
    def dec(t, a, b):  # the tokens at tower positions [a, b)
        return [tok.decoder[i] for i in t.ids[a - 1:b - 1]]

    t = tokenize_with_offsets(tok, "Hello  World!! ok")
    assert dec(t, *t.token_span(7, 12)) == ["world</w>"]
    assert dec(t, *t.token_span(12, 14)) == ["!!</w>"]
    t = tokenize_with_offsets(tok, "dog dog dog.")
    assert [t.token_span(s, s + 3) for s in (0, 4, 8)] == [(1, 2), (2, 3), (3, 4)]  # each occurrence its own
    t = tokenize_with_offsets(tok, "a café ÉCOLE")
    assert t.token_span(7, 12) == (3, 5)  # "ÉCOLE" -> "Ã©" (the byte pair of é) + "cole</w>"
    assert dec(t, *t.token_span(7, 8)) == ["Ã©"]  # the É alone
    t = tokenize_with_offsets(tok, "İstanbul")  # İ lower-cases to i + combining dot: two tokens
    assert t.token_span(0, 1) == (1, 3) and t.token_span(1, 8) == (3, 4)
    t = tokenize_with_offsets(tok, "salt&amp;pepper x")
    assert dec(t, *t.token_span(9, 15)) == ["pepper</w>"] and dec(t, *t.token_span(4, 9)) == ["&</w>"]
    t = tokenize_with_offsets(tok, "naïve")
    assert dec(t, *t.token_span(2, 3)) == ["Ã¯"]  # a span inside a word: the tokens sharing its characters


def test_bad_spans_and_long_text(tok):
    t = tokenize_with_offsets(tok, "a  dog")
    with pytest.raises(TokenAlignmentError, match="covers no token"):
        t.token_span(1, 3)  # the two spaces
    for s, e in ((3, 3), (-1, 2), (2, 99)):
        with pytest.raises(ValueError, match="not a non-empty span"):
            t.token_span(s, e)
    long = tokenize_with_offsets(tok, " ".join(["dog"] * 80))
    assert long.num_positions == 82
    with pytest.raises(PromptTooLongError, match="needs 82 token positions .* context is 77"):
        long.tower_ids(77)


def test_rejects_other_tokenizers():
    with pytest.raises(TypeError, match="SimpleTokenizer"):
        tokenize_with_offsets(lambda texts: None, "a dog")


def test_text_offsets():
    assert words(" a\tbc \u00a0d ") == [(1, 2), (3, 5), (7, 8)]
    out, spans = transform_words("  Two  RED\tstars ", str.lower)
    assert out == "two red stars" == " ".join("  Two  RED\tstars ".lower().split())
    assert spans[4:7] == [(7, 8), (8, 9), (9, 10)] and spans[3] == (7, 7)
    # a change that is not character-wise: aligned by difflib, unchanged characters one to one
    assert align_piece("a&amp;b", "a&b", lambda s: s.replace("&amp;", "&")) == [(0, 1), (1, 2), (6, 7)]
