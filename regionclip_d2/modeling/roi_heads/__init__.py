from .clip_roi_heads import CLIPRes5ROIHeads, CLIPStandardROIHeads, PretrainRes5ROIHeads
from .ov_predictor import NoVocabularyError, OpenVocabularyPredictor
