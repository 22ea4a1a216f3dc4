from .evaluators import build_evaluator, lvis_numpy_compat
