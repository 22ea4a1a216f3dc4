from .clip_roi_heads import CLIPRes5ROIHeads, CLIPStandardROIHeads
from .ov_predictor import NoVocabularyError, OpenVocabularyPredictor
from .vocabulary import TextEmbeddingClassifier, Vocabulary
