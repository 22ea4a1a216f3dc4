"""Post-processing with NMS on the best-scoring prefix equals detectron2's
fast_rcnn_inference over all candidates."""
import pytest
import torch

from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference_single_image

from regionclip_d2.modeling.roi_heads.postprocess import inference_single_image, nms_topk


def _case(seed, regions, classes, class_specific, temp):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(regions, 2, generator=g) * 200
    wh = torch.rand(regions, 2, generator=g) * 120 + 2
    boxes = torch.cat([xy, xy + wh], dim=1)
    if class_specific:
        jitter = torch.randn(regions, classes, 4, generator=g) * 6
        boxes = (boxes[:, None, :] + jitter).reshape(regions, classes * 4)
    scores = torch.softmax(torch.randn(regions, classes + 1, generator=g) / temp, dim=1)
    return boxes, scores


@pytest.mark.parametrize("seed,regions,classes,class_specific,temp,nms,topk", [
    (0, 300, 200, False, 0.3, 0.5, 100),   # most candidates pass the threshold: prefixes are used
    (1, 1000, 60, False, 1.0, 0.9, 100),
    (2, 200, 30, True, 0.5, 0.5, 50),      # class-specific boxes
    (3, 300, 200, False, 0.3, 0.5, 0),
    (4, 300, 200, False, 0.3, 0.3, -1),    # no top-k: everything
    (5, 50, 5, False, 1.0, 0.5, 100),      # fewer candidates than the prefix
])
def test_equals_detectron2(seed, regions, classes, class_specific, temp, nms, topk):
    boxes, scores = _case(seed, regions, classes, class_specific, temp)
    ref, ref_idx = fast_rcnn_inference_single_image(boxes, scores, (240, 320), 1e-4, nms, topk)
    got, got_idx = inference_single_image(boxes, scores, (240, 320), 1e-4, nms, topk)
    assert len(got) == len(ref)
    assert torch.equal(got.scores, ref.scores)
    assert torch.equal(got.pred_classes, ref.pred_classes)
    assert torch.equal(got.pred_boxes.tensor, ref.pred_boxes.tensor)
    assert torch.equal(got_idx, ref_idx)


def test_prefixes_grow_until_enough_survivors_and_respect_ties():
    # 2000 copies of one box in one class: NMS keeps one per prefix, so prefixes must grow to all
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(2000, 1)
    scores = torch.linspace(1.0, 0.5, 2000)
    classes = torch.zeros(2000, dtype=torch.long)
    classes[-5:] = torch.arange(1, 6)  # the 5 worst candidates are the only other survivors
    keep = nms_topk(boxes, scores, classes, 0.5, topk=6, first=16)
    assert sorted(classes[keep].tolist()) == [0, 1, 2, 3, 4, 5]
    # ties at the prefix boundary are all taken in
    scores = torch.cat([torch.full((40,), 0.9), torch.full((40,), 0.8)])
    boxes = torch.rand(80, 2).repeat(1, 2) * 100 + torch.tensor([0.0, 0.0, 5.0, 5.0])
    classes = torch.arange(80)  # all distinct classes: nothing suppressed
    keep = nms_topk(boxes, scores, classes, 0.5, topk=50, first=10)
    assert len(keep) == 50 and (scores[keep][:40] == 0.9).all()
