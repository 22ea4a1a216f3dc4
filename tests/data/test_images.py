"""Images in unusual pixel modes and EXIF-rotated images are read into the right 8-bit RGB
pixels, the same way by the training mapper, the evaluation mapper, the caption mapper and
the demo's reader (regionclip_d2.data.images.read_image)."""
import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import detection_utils as d2_utils

from regionclip_d2 import get_regionclip_cfg
from regionclip_d2.data.captions import CaptionDatasetMapper
from regionclip_d2.data.images import ImageReadError, SizeMismatchError, read_image
from regionclip_d2.data.mappers import build_test_mapper, build_train_mapper

H, W = 16, 8  # rows differ, columns are equal: a horizontal flip (training) changes nothing
PALETTE = [(10, 20, 30), (200, 100, 50), (0, 128, 255), (255, 255, 255)]


def _rows(values):
    """An HxW array whose row y holds values[y % len(values)]."""
    return np.array([values[y % len(values)] for y in range(H)])[:, None].repeat(W, axis=1)


def _grey(a):
    return np.repeat(np.asarray(a, np.uint8)[..., None], 3, axis=2)


def _make(kind, path):
    """Write an image of ``kind`` to ``path``; return (path, expected HxWx3 uint8 RGB, JPEG tolerance)."""
    if kind == "I;16 png":  # 16-bit grayscale: 0, 4369, ..., 65535 -> 0, 17, ..., 255 (detectron2: 0, 255, ...)
        v = _rows([y * 4369 for y in range(16)]).astype(np.uint16)
        Image.fromarray(v).save(path := path.with_suffix(".png"))
        assert Image.open(path).mode == "I;16"
        return path, _grey(_rows([y * 17 for y in range(16)])), 0
    if kind == "I tiff":  # 32-bit integers taken as 16-bit; out-of-range values clipped
        v = _rows([-5, 257 * 100, 65535, 70000]).astype(np.int32)
        Image.fromarray(v, mode="I").save(path := path.with_suffix(".tif"))
        assert Image.open(path).mode == "I"
        return path, _grey(_rows([0, 100, 255, 255])), 0
    if kind == "CMYK jpeg":  # top half red, bottom half cyan; PIL undoes the Adobe inversion
        cmyk = np.zeros((H, W, 4), np.uint8)
        cmyk[: H // 2] = (0, 255, 255, 0)
        cmyk[H // 2:] = (255, 0, 0, 0)
        Image.fromarray(cmyk, mode="CMYK").save(path := path.with_suffix(".jpg"), quality=100)
        assert Image.open(path).mode == "CMYK"
        rgb = np.zeros((H, W, 3), np.uint8)
        rgb[: H // 2] = (255, 0, 0)
        rgb[H // 2:] = (0, 255, 255)
        return path, rgb, 40  # chroma blurs across the edge; the rows away from it are checked tightly below
    if kind in ("P png", "P png transparent"):  # each pixel is its palette colour, the transparent one too
        im = Image.fromarray(_rows([0, 1, 2, 3]).astype(np.uint8), mode="P")
        im.putpalette([c for rgb in PALETTE for c in rgb])
        kw = {"transparency": 1} if kind.endswith("transparent") else {}
        im.save(path := path.with_suffix(".png"), **kw)
        reopened = Image.open(path)
        assert reopened.mode == "P" and (("transparency" in reopened.info) == bool(kw))
        return path, np.array(PALETTE, np.uint8)[_rows([0, 1, 2, 3])], 0
    if kind == "LA png":  # alpha dropped, grey kept (fully transparent rows included)
        la = np.stack([_rows([0, 100, 255]), _rows([0, 255, 128])], axis=2).astype(np.uint8)
        Image.fromarray(la, mode="LA").save(path := path.with_suffix(".png"))
        return path, _grey(_rows([0, 100, 255])), 0
    if kind == "RGBA png":  # alpha dropped, the stored colour kept
        rgba = np.zeros((H, W, 4), np.uint8)
        rgba[..., :3] = np.array(PALETTE, np.uint8)[_rows([0, 1, 2])]
        rgba[..., 3] = _rows([0, 128, 255])
        Image.fromarray(rgba, mode="RGBA").save(path := path.with_suffix(".png"))
        return path, rgba[..., :3].copy(), 0
    if kind == "1 png":
        Image.fromarray(_rows([0, 1]).astype(bool)).save(path := path.with_suffix(".png"))
        assert Image.open(path).mode == "1"
        return path, _grey(_rows([0, 255])), 0
    if kind == "L png":
        Image.fromarray(_rows([3, 77, 250]).astype(np.uint8)).save(path := path.with_suffix(".png"))
        return path, _grey(_rows([3, 77, 250])), 0
    raise ValueError(kind)


KINDS = ["I;16 png", "I tiff", "CMYK jpeg", "P png", "P png transparent", "LA png", "RGBA png", "1 png", "L png"]


def _check(image, expected, tol, kind):
    assert image.dtype == np.uint8 and image.shape == (H, W, 3), (kind, image.dtype, image.shape)
    diff = np.abs(image.astype(int) - expected.astype(int))
    assert diff.max() <= tol, (kind, diff.max())
    if kind == "CMYK jpeg":  # away from the colour edge, the colours are exact to JPEG rounding
        assert diff[[0, 1, 2, -3, -2, -1]].max() <= 4, diff.max()


@pytest.mark.parametrize("kind", KINDS)
def test_read_image_gives_8_bit_rgb_of_the_right_colours(tmp_path, kind):
    path, expected, tol = _make(kind, tmp_path / "img")
    _check(read_image(str(path), "RGB"), expected, tol, kind)
    _check(read_image(str(path), "BGR")[:, :, ::-1], expected, tol, kind)  # the demo's format


def test_detectron2_alone_clips_16_bit_images(tmp_path):
    """Why regionclip_d2 has its own reader: detectron2 (PIL's convert) saturates 16-bit data."""
    path, expected, _ = _make("I;16 png", tmp_path / "img")
    assert (d2_utils.read_image(str(path), "RGB")[1:] == 255).all()  # every row but the first is white
    assert not (expected[1:] == 255).all()


def _cfg(fmt="RGB"):
    cfg = get_regionclip_cfg("configs/Base-CLIP-C4.yaml")
    cfg.merge_from_list(["INPUT.MIN_SIZE_TRAIN", (8,), "INPUT.MAX_SIZE_TRAIN", 1000, "INPUT.MIN_SIZE_TEST", 8,
                         "INPUT.MAX_SIZE_TEST", 1000, "INPUT.FORMAT", fmt])
    return cfg


def _hwc(t):
    return t.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_training_evaluation_and_caption_mappers_read_the_same_pixels(tmp_path, kind):
    path, expected, tol = _make(kind, tmp_path / "img")
    d = {"file_name": str(path), "image_id": 1, "height": H, "width": W, "captions": ["a thing"],
         "annotations": [{"bbox": [0.0, 0.0, 4.0, 4.0], "bbox_mode": 1, "category_id": 0, "iscrowd": 0}]}
    cfg = _cfg()  # sizes equal the image's: the resize is an identity
    torch.manual_seed(0)
    _check(_hwc(build_train_mapper(cfg)(d)["image"]), expected, tol, kind)
    _check(_hwc(build_test_mapper(cfg)(d)["image"]), expected, tol, kind)
    _check(_hwc(CaptionDatasetMapper(cfg, is_train=False)(d)["image"]), expected, tol, kind)
    _check(_hwc(build_test_mapper(_cfg("BGR"))(d)["image"])[:, :, ::-1], expected, tol, kind)


def test_float_images_are_refused_with_a_clear_message(tmp_path):
    Image.fromarray(np.full((4, 4), 0.5, np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(ImageReadError, match=r"f\.tif.*mode F.*8-bit RGB"):
        read_image(str(tmp_path / "f.tif"))


def test_truncated_image_raises(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="truncated"):
        read_image(str(tmp_path / "a.png"))


# --- EXIF orientation ---------------------------------------------------------------------

SW, SH = 48, 16  # stored width, height


def _exif_jpeg(path, orientation):
    """A stored 48x16 JPEG, left half red, right half blue, tagged with ``orientation``."""
    a = np.zeros((SH, SW, 3), np.uint8)
    a[:, : SW // 2] = (255, 0, 0)
    a[:, SW // 2:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(path, quality=100, exif=exif.tobytes())
    return str(path)


def _colour(image, y, x):
    px = image[y, x].astype(int)
    return "red" if px[0] > 200 and px[2] < 60 else "blue" if px[2] > 200 and px[0] < 60 else tuple(px)


def test_exif_rotation_follows_the_annotated_size(tmp_path):
    path = _exif_jpeg(tmp_path / "rot.jpg", 6)  # 6: shown turned 90 degrees clockwise, 16 wide and 48 tall
    upright = read_image(path)  # no annotation (the demo): applied, as detectron2 does
    assert upright.shape == (SW, SH, 3)
    assert _colour(upright, 2, SH // 2) == "red" and _colour(upright, SW - 3, SH // 2) == "blue"
    assert read_image(path, expected_size=(SH, SW)).shape == (SW, SH, 3)  # annotated upright: applied
    stored = read_image(path, expected_size=(SW, SH))  # annotated at the stored size: the stored pixels
    assert stored.shape == (SH, SW, 3)
    assert _colour(stored, SH // 2, 2) == "red" and _colour(stored, SH // 2, SW - 3) == "blue"
    # what detectron2 alone does with an annotation of the stored size
    with pytest.raises(d2_utils.SizeMismatchError):
        d2_utils.check_image_size({"file_name": path, "width": SW, "height": SH}, d2_utils.read_image(path, "RGB"))


def test_size_preserving_exif_tags_are_applied(tmp_path):
    path = _exif_jpeg(tmp_path / "r180.jpg", 3)  # 3: turned 180 degrees, same size: the size cannot tell
    image = read_image(path, expected_size=(SW, SH))
    assert image.shape == (SH, SW, 3)
    assert _colour(image, SH // 2, 2) == "blue" and _colour(image, SH // 2, SW - 3) == "red"


@pytest.mark.parametrize("annotated", ["stored", "upright"])
def test_exif_rotated_image_is_read_the_same_in_training_and_evaluation(tmp_path, annotated):
    path = _exif_jpeg(tmp_path / "rot.jpg", 6)
    if annotated == "stored":  # the box covers the red half of the stored pixels
        w, h, box, shape, (ry, rx) = SW, SH, [0.0, 0.0, SW / 2, SH], (SH, SW), (SH // 2, 4)
    else:  # the box covers the red half of the upright image (its top)
        w, h, box, shape, (ry, rx) = SH, SW, [0.0, 0.0, SH, SW / 2], (SW, SH), (4, SH // 2)
    d = {"file_name": path, "image_id": 1, "width": w, "height": h,
         "annotations": [{"bbox": box, "bbox_mode": 1, "category_id": 0, "iscrowd": 0}]}
    cfg = _cfg()
    cfg.merge_from_list(["MODEL.CLIP.CROP_REGION_TYPE", "GT", "INPUT.RANDOM_FLIP", "none", "INPUT.MIN_SIZE_TRAIN",
                         (min(shape),), "INPUT.MIN_SIZE_TEST", min(shape)])
    for mapper in (build_train_mapper(cfg), build_test_mapper(cfg)):
        out = mapper(d)
        image = _hwc(out["image"])
        assert image.shape[:2] == shape
        x0, y0, x1, y1 = out["instances"].gt_boxes.tensor[0].tolist()
        assert [x0, y0, x1 - x0, y1 - y0] == box
        assert _colour(image, ry, rx) == "red"  # the box is on the red half
    bad = dict(d, width=30, height=30)
    for mapper in (build_train_mapper(cfg), build_test_mapper(cfg)):
        with pytest.raises(SizeMismatchError, match=r"rot\.jpg.*30x30.*EXIF orientation 6"):
            mapper(bad)
