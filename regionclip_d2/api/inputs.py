"""What :class:`~regionclip_d2.api.Detector` takes: images (paths, PIL images, RGB arrays), boxes,
and classes given by example (:class:`Exemplar`), each checked with errors that name the fix."""
import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch

ImageLike = Union[str, os.PathLike, np.ndarray, "PIL.Image.Image"]  # noqa: F821


class DetectorInputError(ValueError):
    """An image, box, class or option given to :class:`Detector` that it cannot use (the
    message says which and how to fix it)."""


# ------------------------------------------------------------------------------------ inputs
def _is_image(x) -> bool:
    from PIL import Image

    return isinstance(x, (str, os.PathLike, np.ndarray, Image.Image))


def load_rgb(image: ImageLike, where: str = "image") -> np.ndarray:
    """An image as an ``H x W x 3`` uint8 RGB array (a copy is not made for arrays).

    ``image``: a file path (read with detectron2's ``read_image``, EXIF orientation applied),
    a PIL image (converted to RGB; its EXIF orientation is not applied) or an ``H x W x 3``
    uint8 numpy array in RGB order. Anything else is a :class:`DetectorInputError` naming the fix.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise DetectorInputError(f"{where}: image file {path!r} does not exist (check the path)")
        from detectron2.data.detection_utils import read_image

        try:
            return read_image(path, format="RGB")
        except Exception as e:  # PIL raises many types for damaged or non-image files
            raise DetectorInputError(f"{where}: {path!r} is not a readable image ({type(e).__name__}: {e}); "
                                     "give a complete JPEG/PNG/BMP/WebP/TIFF file") from None
    if isinstance(image, Image.Image):
        try:
            return np.asarray(image.convert("RGB"))
        except Exception as e:
            raise DetectorInputError(f"{where}: cannot convert the PIL image (mode {image.mode}) to RGB "
                                     f"({type(e).__name__}: {e})") from None
    if torch.is_tensor(image):
        raise DetectorInputError(f"{where}: got a torch tensor {tuple(image.shape)}; give an H x W x 3 uint8 RGB "
                                 "numpy array (e.g. tensor.permute(1, 2, 0).cpu().numpy() for a [3, H, W] "
                                 "uint8 tensor), a PIL image or a path")
    if not isinstance(image, np.ndarray):
        raise DetectorInputError(f"{where}: got {type(image).__name__}; give a path, a PIL image or an H x W x 3 "
                                 "uint8 RGB numpy array")
    a = image
    if a.ndim == 2:
        raise DetectorInputError(f"{where}: the array is {a.shape} (grayscale); give H x W x 3 RGB, e.g. "
                                 "np.repeat(a[:, :, None], 3, axis=2)")
    if a.ndim != 3 or a.shape[2] not in (3,):
        hint = " (RGBA: drop alpha with a[:, :, :3])" if a.ndim == 3 and a.shape[2] == 4 else \
            " (channels first? use a.transpose(1, 2, 0))" if a.ndim == 3 and a.shape[0] == 3 else ""
        raise DetectorInputError(f"{where}: the array has shape {a.shape}; give one H x W x 3 RGB image{hint}"
                                 + ("; for several images pass a list of arrays" if a.ndim == 4 else ""))
    if a.dtype != np.uint8:
        raise DetectorInputError(f"{where}: the array has dtype {a.dtype}; give uint8 values 0..255 (for floats in "
                                 "[0, 1]: (a * 255).round().clip(0, 255).astype(np.uint8))")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise DetectorInputError(f"{where}: the image is empty (shape {a.shape})")
    return a


def _check_readable(image, where: str):
    """Cheap checks before any model work: a path must exist and its header decode."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise DetectorInputError(f"{where}: image file {path!r} does not exist (check the path)")
        from PIL import Image

        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:
            raise DetectorInputError(f"{where}: {path!r} is not a readable image ({type(e).__name__}: {e}); "
                                     "give a complete JPEG/PNG/BMP/WebP/TIFF file") from None
    else:
        load_rgb(image, where)


def _boxes_array(boxes, where: str) -> np.ndarray:
    """``[R, 4]`` float32 XYXY from a list of boxes, an array or a tensor (one box ``[4]`` allowed)."""
    try:
        b = np.asarray(boxes.cpu() if torch.is_tensor(boxes) else boxes, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise DetectorInputError(f"{where}: boxes must be numbers [[x0, y0, x1, y1], ...] ({e})") from None
    if b.size == 0:
        return np.zeros((0, 4), np.float32)
    if b.ndim == 1 and b.shape[0] == 4:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 4:
        raise DetectorInputError(f"{where}: boxes must be [[x0, y0, x1, y1], ...] (shape [R, 4]), got shape "
                                 f"{b.shape}")
    if not np.isfinite(b).all():
        raise DetectorInputError(f"{where}: boxes contain NaN or infinite values")
    return b


def _check_boxes_in_image(b: np.ndarray, h: int, w: int, where: str) -> np.ndarray:
    """Boxes clipped to the image; an error for boxes with no area inside it."""
    bad = np.where((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]))[0]
    if len(bad):
        raise DetectorInputError(f"{where}: box {b[bad[0]].tolist()} has x1 <= x0 or y1 <= y0; boxes are "
                                 "[x0, y0, x1, y1] in pixels (XYXY, not XYWH)")
    c = b.copy()
    c[:, [0, 2]] = c[:, [0, 2]].clip(0, w)
    c[:, [1, 3]] = c[:, [1, 3]].clip(0, h)
    out = np.where((c[:, 2] <= c[:, 0]) | (c[:, 3] <= c[:, 1]))[0]
    if len(out):
        raise DetectorInputError(f"{where}: box {b[out[0]].tolist()} lies outside the {w} x {h} (W x H) image")
    return c


# ------------------------------------------------------------------------------------ classes
@dataclass(frozen=True, eq=False)
class Exemplar:
    """A class given by example boxes instead of a name (image-guided detection).

    Its embedding is the mean of the L2-normalised region embeddings of the boxes, computed by
    the detector's own region encoder (``CLIPFastRCNN.encode_boxes``, the same features the
    detector scores), normalised again. It takes the place of a text embedding in the vocabulary.

    Args:
        name: the label detections of this class get (distinct from the other classes' names).
        image: one example image (a path, a PIL image or an ``H x W x 3`` uint8 RGB array), or a
            list of them.
        boxes: for one image, ``[[x0, y0, x1, y1], ...]`` (``[R, 4]``, XYXY, in that image's pixels
            as loaded: a path's EXIF orientation applied); for a list of images, a list with one
            such ``[R_i, 4]`` per image.
    """

    name: str
    image: Union[ImageLike, Sequence[ImageLike]]
    boxes: Sequence

    def pairs(self) -> List[Tuple[ImageLike, np.ndarray]]:
        """``[(image, [R_i, 4] boxes), ...]``, checked."""
        where = f"Exemplar {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise DetectorInputError(f"Exemplar: name must be a non-empty string, got {self.name!r}")
        if _is_image(self.image):
            images, boxes = [self.image], [self.boxes]
        elif isinstance(self.image, (list, tuple)) and self.image and all(_is_image(x) for x in self.image):
            images, boxes = list(self.image), self.boxes
            if not isinstance(boxes, (list, tuple)) or len(boxes) != len(images):
                raise DetectorInputError(f"{where}: with {len(images)} images give boxes as a list of "
                                         f"{len(images)} box lists (one [[x0, y0, x1, y1], ...] per image)")
        else:
            raise DetectorInputError(f"{where}: image must be a path, a PIL image, an H x W x 3 uint8 RGB array or a "
                                     f"non-empty list of them, got {type(self.image).__name__}")
        out = [(im, _boxes_array(b, f"{where}, image {i}")) for i, (im, b) in enumerate(zip(images, boxes))]
        if sum(len(b) for _, b in out) == 0:
            raise DetectorInputError(f"{where}: no boxes; give at least one [x0, y0, x1, y1] box on its image")
        return out


ClassSpec = Union[str, Exemplar]
