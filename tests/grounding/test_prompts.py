"""Prompts: a class list as "a. b. c." with spans, chunked to the context and merged back;
a free caption's noun phrases (the project's NLTK parser) with spans."""
import open_clip
import pytest
import torch

from regionclip_d2.data.concepts import noun_phrase_spans, parse_caption
from regionclip_d2.data.vocabularies import load_vocabulary
from regionclip_d2.grounding.prompts import (
    NoPhraseError,
    build_class_prompts,
    caption_prompt,
    class_prompt_text,
    merge_chunk_scores,
    phrase_prompt,
)
from regionclip_d2.grounding.tokens import PromptTooLongError


@pytest.fixture(scope="module")
def tok():
    return open_clip.SimpleTokenizer()


def _decoded(tok, prompt, k):
    a, b = prompt.token_spans[k]
    return tok.decode(prompt.token_ids[a:b].tolist()).strip()


def test_class_prompt_by_hand(tok):
    (p,) = build_class_prompts(["circle", "square", "red mug"], tok)
    assert p.caption == "circle. square. red mug."
    assert p.char_spans == [(0, 6), (8, 14), (16, 23)] and p.phrases == ["circle", "square", "red mug"]
    # tokens: <sot> circle . square . red mug . <eot>
    assert p.token_spans == [(1, 2), (3, 4), (5, 7)] and p.num_positions == 9 and p.labels == [0, 1, 2]
    assert torch.equal(p.token_ids, tok([p.caption])[0])
    assert p.positive_map().sum(1).tolist() == [1, 1, 2]
    torch.testing.assert_close(p.positive_map(normalize=True)[2, 5:7], torch.tensor([0.5, 0.5]))
    assert class_prompt_text(["traffic_light", "  Big   Dog ", "table-merged"])[0] == "traffic light. Big Dog. table."
    # a name ending in punctuation keeps its own tokens: ")." would be one token
    (p,) = build_class_prompts(["bow_(weapon)", "bowl"], tok)
    assert p.caption == "bow (weapon) . bowl." and p.phrases == ["bow (weapon)", "bowl"]
    assert [tok.decoder[i] for i in p.token_ids[slice(*p.token_spans[0])].tolist()] == [
        "bow</w>", "(</w>", "weapon</w>", ")</w>"]


@pytest.mark.parametrize("context", [77, 24, 12])
def test_long_vocabulary_is_chunked_never_truncated(tok, context):
    names = load_vocabulary("lvis")[:300] if context == 77 else load_vocabulary("coco")
    prompts = build_class_prompts(names, tok, context_length=context)
    assert len(prompts) > 1
    assert [c for p in prompts for c in p.labels] == list(range(len(names)))  # every class once, in order
    costs = {}
    for p in prompts:
        assert p.num_positions <= context and p.token_ids.shape == (context,)
        assert torch.equal(p.token_ids, tok([p.caption], context_length=context)[0])  # nothing cut off
        for k, c in enumerate(p.labels):
            assert p.phrases[k] == names[c].replace("_", " ")
            # the class's tokens and no others (decode() puts spaces around punctuation)
            assert _decoded(tok, p, k).replace(" ", "") == p.phrases[k].lower().replace(" ", "")
            costs[c] = len(tok.encode(p.phrases[k] + ("." if p.phrases[k][-1].isalnum() else " .")))
    for p, nxt in zip(prompts, prompts[1:]):  # greedy: the next chunk's first class did not fit
        assert p.num_positions + costs[nxt.labels[0]] > context
    # a class has the same tokens in its chunk as in one prompt holding the whole list
    (whole,) = build_class_prompts(names, tok, context_length=10_000)
    for p in prompts:
        for k, c in enumerate(p.labels):
            a, b = p.token_spans[k]
            wa, wb = whole.token_spans[c]
            assert p.token_ids[a:b].tolist() == whole.token_ids[wa:wb].tolist()


def test_class_prompt_errors(tok):
    with pytest.raises(PromptTooLongError, match=r"class 1 \('a very long"):
        build_class_prompts(["dog", "a very long class name " * 3], tok, context_length=8)
    with pytest.raises(ValueError, match="class 1 has an empty name"):
        build_class_prompts(["dog", "  "], tok)
    with pytest.raises(TypeError, match="list of class names"):
        build_class_prompts("dog", tok)
    with pytest.raises(ValueError, match="context_length"):
        build_class_prompts(["dog"], tok, context_length=2)


def test_merge_chunk_scores(tok):
    names = [f"class {w}" for w in "abcdefghij"]
    prompts = build_class_prompts(names, tok, context_length=12)
    assert [len(p) for p in prompts] == [3, 3, 3, 1]
    g = torch.Generator().manual_seed(0)
    chunks = [torch.rand(5, len(p), generator=g) for p in prompts]
    merged = merge_chunk_scores(chunks, prompts)
    assert merged.shape == (5, 10)
    for p, s in zip(prompts, chunks):
        for k, c in enumerate(p.labels):
            assert torch.equal(merged[:, c], s[:, k])
    assert merge_chunk_scores(chunks[:1], prompts[:1], num_classes=10)[:, 3:].isnan().all()
    with pytest.raises(ValueError, match="one per prompt"):
        merge_chunk_scores(chunks[:2], prompts)
    with pytest.raises(ValueError, match="expected"):
        merge_chunk_scores([c[:, :1] for c in chunks], prompts)
    with pytest.raises(ValueError, match="same class"):
        merge_chunk_scores(chunks[:2], [prompts[0], prompts[0]])


def test_caption_prompt_noun_phrases(tok):
    p = caption_prompt("Two red stars next to a  BLUE ring.", tok)
    assert p.phrases == ["red stars", "BLUE ring"] and p.concepts == ["red star", "blue ring"]
    assert p.char_spans == [(4, 13), (25, 34)]
    assert [_decoded(tok, p, k) for k in range(2)] == ["red stars", "blue ring"]
    assert torch.equal(p.token_ids, tok([p.caption])[0])
    # every occurrence, each with its own tokens (parse_caption counts "dog" once)
    p = caption_prompt("A dog chasing a dog", tok)
    assert p.phrases == ["dog", "dog"] and p.token_spans == [(2, 3), (5, 6)]
    assert parse_caption("A dog chasing a dog") == ["dog"]


def test_caption_bad_input(tok):
    for empty in ("", "   "):
        with pytest.raises(NoPhraseError, match="empty caption"):
            caption_prompt(empty, tok)
    with pytest.raises(NoPhraseError, match="no noun phrase"):
        caption_prompt("and then, quickly!", tok)
    with pytest.raises(PromptTooLongError, match="split it"):
        caption_prompt(" ".join(["a red dog"] * 30), tok)
    with pytest.raises(ValueError, match="not a non-empty span"):
        phrase_prompt("a dog", [(2, 9)], tok)
    p = phrase_prompt("a dog and a cat", [(0, 5), (10, 15)], tok, labels=[7, 3])
    assert p.phrases == ["a dog", "a cat"] and p.labels == [7, 3] and p.token_spans == [(1, 3), (4, 6)]


def test_noun_phrase_spans_are_those_of_the_concept_parser():
    """Same parser: the spans' concepts are parse_caption's concepts (on the fixture of
    tests/data/test_concepts.py), and each span slices the caption as written."""
    captions = ["Two red stars next to a blue ring.", "A red star above the moon.",
                "The blue ring is on a wooden table.", "Three geese near a traffic light.", "A dog chasing a dog.",
                'He said "a BIG  dog" can\'t see Café  cats...', "İstanbul has old   Bazaars"]
    for cap in captions:
        phrases = noun_phrase_spans(cap)
        for ph in phrases:
            assert cap[ph.start:ph.end] == ph.text
            assert ph.text.lower().split()[:-1] == ph.concept.split()[:-1]  # only the head is lemmatised
        concepts = list(dict.fromkeys(c for ph in phrases for c in (ph.head, ph.concept)))
        assert concepts == parse_caption(cap)
    assert [p.text for p in noun_phrase_spans('He said "a BIG  dog" can\'t see Café  cats...')] == ["BIG  dog", "cats"]
    assert [(p.text, p.concept) for p in noun_phrase_spans("Three geese near a traffic light.")] == [
        ("geese", "goose"), ("traffic light", "traffic light")]
