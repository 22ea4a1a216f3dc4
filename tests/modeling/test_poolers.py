"""RoIAlign split over CPU threads gives the same output and gradients as one call."""
import pytest
import torch

from detectron2.layers import ROIAlign
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes

from regionclip_d2.modeling.poolers import ThreadedROIAlign, thread_roi_align


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _rois(n, g):
    xy = torch.rand(n, 2, generator=g) * 150
    wh = torch.rand(n, 2, generator=g) * 100 + 1
    return torch.cat([torch.randint(0, 2, (n, 1), generator=g).float(), xy, xy + wh], dim=1)


def test_threaded_roi_align_is_exact(two_threads):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 12, 12, generator=g)
    rois = _rois(101, g)
    plain = ROIAlign((7, 7), 1 / 16, 0, aligned=True)
    threaded = ThreadedROIAlign(plain, min_regions=4)
    with torch.inference_mode():
        assert torch.equal(threaded(x, rois), plain(x, rois))
        assert torch.equal(threaded(x, rois[:3]), plain(x, rois[:3]))  # below the threshold: one call
        # a channels-last feature map (the folded backbones' output) pools the same
        assert torch.equal(threaded(x.contiguous(memory_format=torch.channels_last), rois), plain(x, rois))
        assert threaded(x, rois[:0]).shape == (0, 8, 7, 7)
    # training: the same gradients
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(101, 8, 7, 7, generator=g)
    (plain(xa, rois) * w).sum().backward()
    out = threaded(xb, rois)
    assert out.requires_grad
    (out * w).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-6)
    with torch.no_grad():
        assert not threaded(x.requires_grad_(), rois).requires_grad


def test_pooler_wrapping(two_threads):
    pooler = thread_roi_align(ROIPooler((7, 7), scales=(1 / 16,), sampling_ratio=0, pooler_type="ROIAlignV2"))
    assert isinstance(pooler.level_poolers[0], ThreadedROIAlign)
    assert not list(pooler.state_dict())  # no weights: checkpoints are unchanged
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(1, 4, 20, 20, generator=g)]
    boxes = [Boxes(_rois(200, g)[:, 1:])]
    ref = ROIPooler((7, 7), scales=(1 / 16,), sampling_ratio=0, pooler_type="ROIAlignV2")
    assert torch.equal(pooler(feats, boxes), ref(feats, boxes))


@pytest.mark.parametrize("config", ["configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml",
                                    "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_FPN_zsinf_GT.yaml"])
def test_threaded_path_inside_the_detector(config, tiny_clip_config, two_threads):
    """A detector scoring 100 regions (over the 64-region threshold) pools them on two threads
    and gives exactly the single-thread result."""
    from helpers import image_input, tiny_model

    model = tiny_model(config, tiny_clip_config)
    pooler = model.roi_heads.pooler if hasattr(model.roi_heads, "pooler") else model.roi_heads.box_pooler
    calls = []
    for level in pooler.level_poolers:
        assert isinstance(level, ThreadedROIAlign)
        inner = level.inner.forward
        level.inner.forward = lambda x, rois, inner=inner: (calls.append(len(rois)), inner(x, rois))[1]
    g = torch.Generator().manual_seed(2)
    boxes = [_rois(100, g)[:, 1:].clamp(max=127.0)]
    x = [image_input(128, 128)]
    threaded = model.encode_boxes(x, boxes)[0]
    assert len(calls) > len(pooler.level_poolers) and max(calls) < 100  # the regions were split
    torch.set_num_threads(1)
    calls.clear()
    single = model.encode_boxes(x, boxes)[0]
    assert sum(calls) == 100 and len(calls) <= len(pooler.level_poolers)  # one call per level
    assert torch.equal(threaded, single)


def test_threaded_roi_align_under_bf16_autocast(two_threads):
    """Autocast is per thread: the workers get the caller's, so bf16 input is pooled (in float32,
    torchvision's autocast rule) exactly as one call does; it used to fail in the workers
    ("roi_align_forward_kernel not implemented for 'BFloat16'")."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 12, 12, generator=g).bfloat16()
    rois = _rois(150, g)
    plain = ROIAlign((7, 7), 1 / 16, 0, aligned=True)
    threaded = ThreadedROIAlign(plain)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = plain(x, rois)
        assert torch.equal(threaded(x, rois), want)
    xa, xb = x.float().clone().requires_grad_(), x.float().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = plain(xa.bfloat16(), rois), threaded(xb.bfloat16(), rois)
    assert torch.equal(a, b)
    a.float().sum().backward()
    b.float().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=2e-2, atol=1e-3)  # bf16 sums, in another order


def test_bf16_detector_over_the_threaded_region_count(tiny_clip_config, two_threads):
    """INFERENCE_DTYPE bfloat16 with 100 regions (the threaded RoIAlign path) runs and keeps the
    float32 classification of the boxes (GT mode: the same regions in both)."""
    from helpers import image_input, tiny_model

    config = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml"
    g = torch.Generator().manual_seed(5)
    boxes = _rois(100, g)[:, 1:].clamp(max=127.0)
    x = [image_input(128, 128, boxes=boxes.tolist())]
    extra = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "MODEL.ROI_HEADS.NMS_THRESH_TEST", 1.0,
             "TEST.DETECTIONS_PER_IMAGE", 1000, "MODEL.CLIP.NO_BOX_DELTA", True]
    fp32 = tiny_model(config, tiny_clip_config, extra=extra)
    bf16 = tiny_model(config, tiny_clip_config, extra=extra + ["MODEL.CLIP.INFERENCE_DTYPE", "bfloat16"])
    a = fp32.encode_boxes(x, [boxes])[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b = bf16.encode_boxes(x, [boxes])[0]
    with torch.no_grad():
        out = bf16(x)[0]["instances"]  # the bf16 model's own path (autocast inside)
    assert len(out) >= 100 and out.scores.dtype == torch.float32 and torch.isfinite(out.scores).all()
    assert torch.nn.functional.cosine_similarity(a, b.float(), dim=1).min() > 0.99
