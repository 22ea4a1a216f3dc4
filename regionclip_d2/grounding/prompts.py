"""Text prompts for phrase grounding (GLIP): a class list as one caption, or a free caption's
noun phrases, each phrase with its character span and its token span in CLIP's tokens.

* :func:`build_class_prompts`: ``["circle", "square", "red mug"]`` -> ``"circle. square. red
  mug."`` with the span of each class; a vocabulary too long for the text tower's context is
  chunked into several prompts (never truncated), and :func:`merge_chunk_scores` puts
  per-chunk results back in global class order.
* :func:`caption_prompt`: a free caption -> its noun phrases, found by the project's NLTK
  parser (:func:`regionclip_d2.data.concepts.noun_phrase_spans`).
* :func:`phrase_prompt`: a caption with given character spans (grounding annotations).

Token spans are text-tower positions: start-of-text at 0, so ``features[:, a:b]`` of the
tower's per-token output (:mod:`regionclip_d2.grounding.text_features`) are a phrase's tokens.
A span covers every token that shares a character with the phrase (see
:mod:`regionclip_d2.grounding.tokens`).
"""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from ..data.vocabularies import prompt_name
from .tokens import PromptTooLongError, Span, TokenizedText, check_tokenizer, tokenize_with_offsets

END = "."  # after each class name; a space between the names


def _ending(name: str) -> str:
    """``"."``, or ``" ."`` after a name ending in punctuation: CLIP's tokenizer would merge
    ``")."`` into one token, which the name and the separator would then share."""
    return END if name[-1].isalnum() else " " + END


class NoPhraseError(ValueError):
    """A caption with nothing to ground (empty, or no noun phrase)."""


@dataclass
class GroundingPrompt:
    """One text the tower encodes and the phrases to ground in it.

    Attributes:
        caption: the text.
        phrases: ``caption[start:end]`` of each phrase.
        char_spans: ``[start, end)`` of each phrase in ``caption``.
        token_spans: ``[start, end)`` text-tower positions of each phrase (start-of-text at 0).
        labels: for a class prompt, each phrase's global class index; for a caption, the
            phrase index (0, 1, ...).
        token_ids: ``[context_length]`` ids, equal to the tokenizer's ``__call__`` on ``caption``.
        num_positions: positions in use (start-of-text ... end-of-text).
        concepts: for :func:`caption_prompt`, each phrase's lemmatised concept ("red star").
        token_positions: for a phrase named in several places (:func:`grounded_prompt`), the
            text-tower positions of all its spans; ``None``: each phrase's ``token_spans``.
        ignore_positions: positions a training loss leaves out (words naming objects whose
            boxes are withheld, :func:`grounded_prompt`); empty for the other prompts.
    """

    caption: str
    phrases: List[str]
    char_spans: List[Span]
    token_spans: List[Span]
    labels: List[int]
    token_ids: torch.Tensor
    num_positions: int
    concepts: Optional[List[str]] = field(default=None)
    token_positions: Optional[List[List[int]]] = field(default=None)
    ignore_positions: List[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.phrases)

    @property
    def context_length(self) -> int:
        return int(self.token_ids.shape[0])

    def positive_map(self, normalize: bool = False) -> torch.Tensor:
        """``[num_phrases, context_length]``: 1 at each phrase's token positions (GLIP's
        token targets); with ``normalize`` each row sums to 1 (a phrase's score = the mean of
        its tokens' scores)."""
        if self.token_positions is None:
            return positive_map(self.token_spans, self.context_length, normalize)
        out = torch.zeros(len(self.token_positions), self.context_length)
        for i, pos in enumerate(self.token_positions):
            out[i, list(pos)] = 1.0
        if normalize and len(out):
            out = out / out.sum(dim=1, keepdim=True)
        return out


def positive_map(token_spans: Sequence[Span], context_length: int, normalize: bool = False) -> torch.Tensor:
    """``[len(token_spans), context_length]`` float: row ``i`` is 1 on ``[a_i, b_i)``."""
    out = torch.zeros(len(token_spans), context_length)
    for i, (a, b) in enumerate(token_spans):
        if not 0 <= a < b <= context_length:
            raise ValueError(f"token span [{a}, {b}) is outside the context of {context_length} positions")
        out[i, a:b] = 1.0
    if normalize and len(token_spans):
        out = out / out.sum(dim=1, keepdim=True)
    return out


def _context_length(tokenizer, context_length: Optional[int]) -> int:
    n = context_length or getattr(tokenizer, "context_length", None)
    if not n or n < 3:
        raise ValueError(f"context_length {n!r}: give the text tower's context length (77 for CLIP, "
                         "the model config's text_cfg.context_length otherwise)")
    return int(n)


def _prompt(tokenized: TokenizedText, char_spans: Sequence[Span], labels: Sequence[int], context_length: int,
            what: str, concepts=None) -> GroundingPrompt:
    tokenized.check_fits(context_length, what)
    text = tokenized.text
    return GroundingPrompt(caption=text, phrases=[text[a:b] for a, b in char_spans],
                           char_spans=[(int(a), int(b)) for a, b in char_spans],
                           token_spans=[tokenized.token_span(int(a), int(b)) for a, b in char_spans],
                           labels=list(labels), token_ids=tokenized.tower_ids(context_length),
                           num_positions=tokenized.num_positions, concepts=concepts)


def _class_names(class_names: Sequence[str]) -> List[str]:
    if isinstance(class_names, str):
        raise TypeError("class_names is a string: give a list of class names")
    names = []
    for i, n in enumerate(class_names):
        name = " ".join(prompt_name(str(n)).split())
        if not name:
            raise ValueError(f"class {i} has an empty name ({n!r}): every class needs a name to put in the prompt")
        names.append(name)
    if not names:
        raise ValueError("no class names: give at least one class")
    return names


def class_prompt_text(class_names: Sequence[str]) -> Tuple[str, List[Span]]:
    """``"circle. square. red mug."`` and each name's character span (a name ending in
    punctuation is followed by ``" ."``: ``"bow (weapon) . bowl."``). Names are written as
    the text-embedding classifier writes them (``vocabularies.prompt_name``: ``traffic_light``
    -> ``traffic light``, ``-other`` / ``-merged`` dropped), whitespace collapsed."""
    names = _class_names(class_names)
    spans, pos = [], 0
    for n in names:
        spans.append((pos, pos + len(n)))
        pos += len(n) + len(_ending(n)) + 1
    return " ".join(n + _ending(n) for n in names), spans


def build_class_prompts(class_names: Sequence[str], tokenizer, context_length: Optional[int] = None
                        ) -> List[GroundingPrompt]:
    """The class list as one or more prompts ``"name. name. name."``, in class order, each
    fitting the text tower's context (``context_length``, default the tokenizer's): a chunk
    takes as many classes as fit, the next chunk starts with the next class. ``labels`` are
    the global class indices. A single class name longer than the context raises
    :class:`PromptTooLongError` naming it.
    """
    check_tokenizer(tokenizer)
    length = _context_length(tokenizer, context_length)
    names = _class_names(class_names)
    # a prompt is " ".join(name + ending): the tokenizer never joins characters across a space
    # into one token, so a chunk's token count is the sum of its classes' counts (a chunk that
    # does not fit after all is split)
    costs = [len(tokenizer.encode(n + _ending(n))) for n in names]
    budget = length - 2
    chunks: List[List[int]] = []
    for i, c in enumerate(costs):
        if c > budget:
            raise PromptTooLongError(f"class {i} ({names[i][:80]!r}) alone needs {c + 2} token positions but the "
                                     f"text tower's context is {length}: shorten its name")
        if chunks and sum(costs[j] for j in chunks[-1]) + c <= budget:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    prompts: List[GroundingPrompt] = []
    pending = chunks[::-1]
    while pending:
        chunk = pending.pop()
        text, spans = class_prompt_text([names[i] for i in chunk])
        tokenized = tokenize_with_offsets(tokenizer, text)
        if tokenized.num_positions > length and len(chunk) > 1:  # not additive after all (ftfy): split it
            half = len(chunk) // 2
            pending += [chunk[half:], chunk[:half]]
            continue
        prompts.append(_prompt(tokenized, spans, chunk, length, "class prompt"))
    return prompts


def merge_chunk_scores(chunk_scores: Sequence[torch.Tensor], prompts: Sequence[GroundingPrompt],
                       num_classes: Optional[int] = None, fill: float = float("nan")) -> torch.Tensor:
    """Per-chunk, per-class results ``[..., len(prompt)]`` (one tensor per prompt of
    :func:`build_class_prompts`, same leading shape) -> ``[..., num_classes]`` in global class
    order (by each prompt's ``labels``). ``num_classes`` defaults to the largest label + 1;
    classes no chunk covers are ``fill``."""
    if len(chunk_scores) != len(prompts):
        raise ValueError(f"{len(chunk_scores)} score tensors for {len(prompts)} prompts: give one per prompt")
    if not prompts:
        raise ValueError("no prompts to merge")
    labels = [lab for p in prompts for lab in p.labels]
    if len(set(labels)) != len(labels):
        raise ValueError("two prompts hold the same class: merge the chunks of one build_class_prompts call")
    n = num_classes if num_classes is not None else max(labels) + 1
    if max(labels) >= n:
        raise ValueError(f"class index {max(labels)} does not fit num_classes={n}")
    lead = chunk_scores[0].shape[:-1]
    for s, p in zip(chunk_scores, prompts):
        if s.shape[:-1] != lead or s.shape[-1] != len(p):
            raise ValueError(f"a chunk's scores have shape {tuple(s.shape)}, expected {tuple(lead) + (len(p),)}")
    out = chunk_scores[0].new_full(tuple(lead) + (n,), fill)
    out[..., torch.tensor(labels, dtype=torch.long, device=out.device)] = torch.cat(list(chunk_scores), dim=-1)
    return out


def phrase_prompt(caption: str, char_spans: Sequence[Span], tokenizer, context_length: Optional[int] = None,
                  labels: Optional[Sequence[int]] = None) -> GroundingPrompt:
    """A caption with given phrase spans (e.g. ``tokens_positive`` of grounding data). Raises
    :class:`PromptTooLongError` if the caption does not fit the context."""
    length = _context_length(tokenizer, context_length)
    caption = str(caption)
    if not caption.strip():
        raise NoPhraseError("empty caption: nothing to ground")
    for a, b in char_spans:
        if not 0 <= a < b <= len(caption):
            raise ValueError(f"span [{a}, {b}) is not a non-empty span of the caption {caption[:80]!r} "
                             f"({len(caption)} characters)")
    labels = list(range(len(char_spans))) if labels is None else list(labels)
    return _prompt(tokenize_with_offsets(tokenizer, caption), char_spans, labels, length, "caption")


def grounded_prompt(caption: str, phrase_spans: Sequence[Sequence[Span]], tokenizer,
                    context_length: Optional[int] = None, ignore_spans: Sequence[Span] = ()) -> GroundingPrompt:
    """A caption of grounding data and its grounded phrases, each given by the character
    spans that name it (one or several: an annotation's ``tokens_positive``); phrase ``i``
    is class ``i``. ``phrases`` / ``char_spans`` / ``token_spans`` hold each phrase's first
    span, ``token_positions`` the tokens of all of them (what :meth:`GroundingPrompt.positive_map`
    uses); ``ignore_spans`` (e.g. MDETR-style ``tokens_withheld``) become ``ignore_positions``.
    Raises :class:`NoPhraseError` for an empty caption, ``ValueError`` for a span outside it
    and :class:`PromptTooLongError` for a caption longer than the context."""
    groups = [[(int(a), int(b)) for a, b in spans] for spans in phrase_spans]
    if any(not g for g in groups):
        raise ValueError("a phrase without spans: give each phrase at least one [start, end) span")
    prompt = phrase_prompt(caption, [g[0] for g in groups], tokenizer, context_length)
    tokenized = tokenize_with_offsets(tokenizer, prompt.caption)

    def positions(spans):
        pos = set()
        for a, b in spans:
            if not 0 <= a < b <= len(prompt.caption):
                raise ValueError(f"span [{a}, {b}) is not a non-empty span of the caption {prompt.caption[:80]!r} "
                                 f"({len(prompt.caption)} characters)")
            s, e = tokenized.token_span(a, b)
            pos.update(range(s, e))
        return sorted(pos)

    if any(len(g) > 1 for g in groups):
        prompt.token_positions = [positions(g) for g in groups]
    prompt.ignore_positions = positions(ignore_spans)
    return prompt


def caption_prompt(caption: str, tokenizer, context_length: Optional[int] = None,
                   max_phrase_words: Optional[int] = None) -> GroundingPrompt:
    """A free caption and its noun phrases (the project's NLTK parser, see
    :func:`regionclip_d2.data.concepts.noun_phrase_spans`; all occurrences, in order).

    Raises :class:`NoPhraseError` for an empty caption or one without a noun phrase (give
    the phrases' spans to :func:`phrase_prompt` instead), :class:`PromptTooLongError` for one
    longer than the context (split it)."""
    from ..data.concepts import DEFAULT_MAX_PHRASE_WORDS, noun_phrase_spans

    caption = str(caption)
    if not caption.strip():
        raise NoPhraseError("empty caption: nothing to ground")
    phrases = noun_phrase_spans(caption, max_phrase_words or DEFAULT_MAX_PHRASE_WORDS)
    if not phrases:
        raise NoPhraseError(f"caption {caption[:80]!r} has no noun phrase: name the objects to ground, or give "
                            "their character spans to phrase_prompt")
    prompt = phrase_prompt(caption, [(p.start, p.end) for p in phrases], tokenizer, context_length)
    prompt.concepts = [p.concept for p in phrases]
    return prompt
