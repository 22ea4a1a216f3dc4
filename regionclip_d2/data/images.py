"""Reading images the same way in training, evaluation and the demo.

:func:`read_image` replaces detectron2's ``read_image`` everywhere in regionclip_d2 (the
detection mappers of :mod:`regionclip_d2.data.mappers`, the caption mapper, ``tools/demo.py``).
It differs in two ways.

**Pixel modes.** Every image becomes 8-bit RGB (then the requested format, ``RGB`` or
``BGR``), HxWx3 ``uint8``:

* 16-bit grayscale (PIL modes ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) and 32-bit integer
  images (mode ``I``, which older Pillow versions and some TIFF writers use for 16-bit data)
  are scaled from 0..65535 to 0..255 (``round(v * 255 / 65535)``; values outside are
  clipped). detectron2 (``PIL.Image.convert``) clips them at 255 instead, so every pixel of
  a 16-bit image above 255 -- almost all of it -- came out white;
* palette images (``P``, ``PA``) take their palette colours; CMYK (JPEG, TIFF; PIL undoes the
  Adobe inversion of CMYK JPEGs) is converted with PIL's formula, without colour management
  (an embedded ICC profile is not applied, colours are close, not exact);
* transparency is dropped: ``RGBA``, ``LA``, ``PA`` and palette images with a transparent
  index keep the colour stored under the alpha channel (PIL's ``convert("RGB")``). This is
  what detectron2's reader, the official RegionCLIP code and CLIP's own preprocessing do,
  so the model sees such images as it was trained to see them;
* 32-bit float images (mode ``F``), whose value range a file does not state, and modes PIL
  cannot convert are refused with :class:`ImageReadError` naming the file, its mode and the fix.

**EXIF orientation.** detectron2 turns an image upright by its EXIF ``Orientation`` tag
(``exif_transpose``), which swaps width and height for the four tags that rotate by 90
degrees (5-8). Whether the annotations of such an image refer to the upright image or to
the stored pixels depends on the tool that made them: COCO's own images were annotated in
browsers that did not apply EXIF tags (they did not until 2020) and record the stored size,
while tools that apply the tag record the upright size. A COCO annotation records the size
of the image its coordinates refer to (``width``/``height``), so :func:`read_image` takes it
as the evidence when it is given (``expected_size``):

* the annotation records the upright size (or no size is given, as in the demo): the tag
  is applied, as detectron2 does;
* the annotation records the stored size, and applying the tag would swap width and height:
  the stored pixels are returned, untransposed, so the boxes land on what they were drawn
  on. detectron2 raised ``SizeMismatchError`` here, in training and in evaluation;
* both sizes are the same (tags 2-4, which flip or turn by 180 degrees, and square images):
  the size cannot tell, and the tag is applied, as detectron2 does (so numbers stay
  comparable with detectron2-based evaluations, the official RegionCLIP code included).

The detection mappers pass the annotated size in training and in evaluation alike, so an
image is read the same way in both; a size that matches neither orientation is
:class:`SizeMismatchError` (a subclass of detectron2's), naming both sizes and the tag.
"""
import logging
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from detectron2.data import detection_utils as d2_utils
from detectron2.utils.file_io import PathManager

logger = logging.getLogger(__name__)

EXIF_ORIENTATION_TAG = 274
_SWAPS_SIZE = {5, 6, 7, 8}  # the EXIF orientations that rotate by 90 degrees
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_logged_stored_orientation = set()


class ImageReadError(ValueError):
    """An image file that cannot be turned into an 8-bit RGB image."""


class SizeMismatchError(d2_utils.SizeMismatchError):
    """The decoded image's size matches neither the annotated size nor, for EXIF-rotated
    images, its transpose."""


def exif_orientation(image: Image.Image) -> int:
    """The EXIF ``Orientation`` tag of a PIL image (1, upright, when absent or unreadable)."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001  damaged EXIF blocks raise many types; detectron2 ignores them too
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def to_rgb(image: Image.Image, file_name: str = "") -> Image.Image:
    """An 8-bit RGB PIL image from any PIL mode (see the module docstring); raises
    :class:`ImageReadError` for float and unconvertible modes."""
    mode = image.mode
    if mode == "RGB":
        return image
    where = f"{file_name}: " if file_name else ""
    if mode in _SIXTEEN_BIT_MODES:
        a = np.asarray(image).astype(np.int64)
        if a.ndim != 2:
            raise ImageReadError(f"{where}{mode} image decoded to shape {a.shape}, expected a single channel")
        a = (np.clip(a, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(a.astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        raise ImageReadError(f"{where}a 32-bit floating-point image (PIL mode F) has no stated value range: "
                             "convert it to 8-bit RGB (e.g. PIL: Image.fromarray(to_uint8(array)).save(...))")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageReadError(f"{where}cannot convert an image of PIL mode {mode} to RGB ({e}): save it as "
                             "8-bit RGB, grayscale or palette") from e


def _choose_orientation(image: Image.Image, expected_size: Optional[Tuple[int, int]], file_name: str):
    """The image the annotation refers to: upright, or stored (see the module docstring)."""
    orientation = exif_orientation(image)
    if orientation == 1:
        return image, 1
    if expected_size is not None and orientation in _SWAPS_SIZE:
        stored = image.size  # (width, height)
        upright = (stored[1], stored[0])
        expected = (int(expected_size[0]), int(expected_size[1]))
        if expected == stored and expected != upright:
            if file_name not in _logged_stored_orientation and len(_logged_stored_orientation) < 20:
                _logged_stored_orientation.add(file_name)
                logger.info("%s: read in its stored orientation, EXIF orientation %d not applied: the annotation "
                            "records the stored size %dx%d (applying it would give %dx%d)", file_name,
                            orientation, stored[0], stored[1], upright[0], upright[1])
            return image, 1
    return d2_utils._apply_exif_orientation(image), orientation


def open_image(file_name: str, expected_size: Optional[Tuple[int, int]] = None) -> Tuple[Image.Image, int]:
    """Decode ``file_name`` into an 8-bit RGB PIL image, oriented as the annotation's
    ``expected_size`` ``(width, height)`` says (see the module docstring). Returns the image
    and the EXIF orientation that was applied (1: none)."""
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        image.load()  # decodes now, inside the file's context: truncated files raise here
        image, applied = _choose_orientation(image, expected_size, str(file_name))
        return to_rgb(image, str(file_name)), applied


def read_image(file_name: str, format: Optional[str] = "RGB",
               expected_size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """``file_name`` as an HxWx3 ``uint8`` array in ``format`` (``RGB``, ``BGR``, or another
    format of detectron2's ``read_image``), from any pixel mode, oriented as
    ``expected_size`` ``(width, height)`` -- the annotated size -- says; without it, EXIF
    orientation is applied as detectron2 does. See the module docstring."""
    image, _ = open_image(file_name, expected_size)
    return d2_utils.convert_PIL_to_numpy(image, format or "RGB")


def annotated_size(dataset_dict: dict) -> Optional[Tuple[int, int]]:
    """``(width, height)`` of a dataset dict, or ``None`` when it records no size."""
    w, h = dataset_dict.get("width"), dataset_dict.get("height")
    return None if w is None or h is None else (int(w), int(h))


def check_image_size(dataset_dict: dict, image: np.ndarray) -> None:
    """detectron2's ``check_image_size`` (fills in a missing width/height), with an error
    that names the file, both sizes and the EXIF tag."""
    expected = annotated_size(dataset_dict)
    h, w = image.shape[:2]
    if expected is not None and expected != (w, h):
        name = dataset_dict.get("file_name", f"image_id {dataset_dict.get('image_id')}")
        note = ""
        try:
            with PathManager.open(name, "rb") as f:
                im = Image.open(f)
                tag = exif_orientation(im)
                if tag != 1:
                    note = f" (stored {im.size[0]}x{im.size[1]} with EXIF orientation {tag})"
        except Exception:  # noqa: BLE001  only for the message
            pass
        raise SizeMismatchError(f"{name}: the annotation records {expected[0]}x{expected[1]} (width x height) but "
                                f"the image is {w}x{h}{note}: fix width/height in the annotation file or replace "
                                "the image")
    dataset_dict.setdefault("width", w)
    dataset_dict.setdefault("height", h)
