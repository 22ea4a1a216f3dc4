"""Phrase grounding (GLIP, issue 14), in progress: prompts with character and token spans,
per-token text features, grounding data, and the grounding head's pieces (alignment
logits, class scores from token spans, token targets, focal loss, deep fusion). Wiring the
head into the detectors, its configs, training and inference do not exist yet.

``tokens``: exact character <-> CLIP token alignment; ``prompts``: class prompts (chunked)
and caption noun phrases; ``text_features``: per-token projected text features; ``data``:
the MDETR-style grounding format, detection data through the class prompt; ``head``: the
grounding head's modules and loss.
"""
from .head import (
    BiCrossAttentionLayer,
    DeepFusion,
    RegionTokenAlignment,
    class_scores,
    grounding_focal_loss,
    token_targets,
)
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
