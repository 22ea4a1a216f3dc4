"""The web app: open-vocabulary detection in a browser (``make app`` or ``tools/app.py``).

:func:`create_app` builds the FastAPI app around a detector factory; see :mod:`.server` for the
endpoints, the limits and why FastAPI with one plain page was chosen over Gradio.
"""
from .server import (
    MAX_CLASSES,
    MAX_IMAGE_PIXELS,
    MAX_NAME_CHARS,
    MAX_UPLOAD_BYTES,
    AppError,
    create_app,
    default_samples,
)

__all__ = ["create_app", "default_samples", "AppError", "MAX_CLASSES", "MAX_IMAGE_PIXELS", "MAX_NAME_CHARS",
           "MAX_UPLOAD_BYTES"]
