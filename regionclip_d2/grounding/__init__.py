"""Phrase grounding (GLIP, issue 14), in progress: prompts with character and token spans,
per-token text features, grounding data, the grounding head's pieces (alignment logits,
class scores from token spans, token targets, focal loss, deep fusion) and the head as the
box predictor of the C4 and FPN detectors (``MODEL.GROUNDING.ENABLED``: class prompts in
training and at inference, a caption's phrases at inference). Training on captions of
grounding data, ``tools/demo.py --caption`` and grounding recall are not there yet.

``tokens``: exact character <-> CLIP token alignment; ``prompts``: class prompts (chunked)
and caption noun phrases; ``text_features``: per-token projected text features; ``data``:
the MDETR-style grounding format, detection data through the class prompt; ``head``: the
grounding head's modules and loss; ``predictor``: the head in the detectors.
"""
from .head import (
    BiCrossAttentionLayer,
    DeepFusion,
    RegionTokenAlignment,
    class_scores,
    grounding_focal_loss,
    token_targets,
)
from .predictor import GroundingPredictor, NoTokenEncoderError
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
