"""Phrase grounding (GLIP, issue 14), in progress: prompts with character and token spans,
per-token text features, and grounding data. The grounding head, its training and
inference do not exist yet.

``tokens``: exact character <-> CLIP token alignment; ``prompts``: class prompts (chunked)
and caption noun phrases; ``text_features``: per-token projected text features; ``data``:
the MDETR-style grounding format, detection data through the class prompt.
"""
from .prompts import (
    GroundingPrompt,
    NoPhraseError,
    build_class_prompts,
    caption_prompt,
    merge_chunk_scores,
    phrase_prompt,
    positive_map,
)
from .tokens import PromptTooLongError, TokenAlignmentError, TokenizedText, tokenize_with_offsets
