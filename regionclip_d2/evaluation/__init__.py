from .evaluators import build_evaluator, lvis_numpy_compat
from .unreadable import UnreadableImagesError, evaluate_skipping_unreadable
