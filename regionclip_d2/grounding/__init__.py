"""Phrase grounding (GLIP): prompts with character and token spans, per-token text
features, grounding data, the grounding head's pieces (alignment logits, class scores from
token spans, token targets, focal loss, deep fusion) and the head as the box predictor of
the C4 and FPN detectors (``MODEL.GROUNDING.ENABLED``): trained on detection data through
the class prompt and on grounding data through each image's caption (``mapper``), used at
inference with a class list, a caption's noun phrases (``tools/demo.py --caption``) or
grounding data's phrases (phrase recall, :class:`regionclip_d2.evaluation.grounding_recall.GroundingEvaluator`).

``tokens``: exact character <-> CLIP token alignment; ``prompts``: class prompts (chunked)
and caption noun phrases; ``text_features``: per-token projected text features; ``data``:
the MDETR-style grounding format, detection data through the class prompt; ``mapper``:
grounding data through detectron2's loader; ``head``: the grounding head's modules and
loss; ``predictor``: the head in the detectors.
"""
from .head import (
    BiCrossAttentionLayer,
    DeepFusion,
    RegionTokenAlignment,
    class_scores,
    grounding_focal_loss,
    token_targets,
)
from .mapper import GroundingDatasetMapper
from .predictor import GroundingPredictor, NoTokenEncoderError
from .prompts import (
    GroundingPrompt,
    NoPhraseError,
    build_class_prompts,
    caption_prompt,
    grounded_prompt,
    merge_chunk_scores,
    phrase_prompt,
    positive_map,
)
from .tokens import PromptTooLongError, TokenAlignmentError, TokenizedText, tokenize_with_offsets
