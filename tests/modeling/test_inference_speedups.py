"""The opt-in speed paths keep detections equal to the plain path within stated tolerances:
res5 in chunks (exact up to float rounding), channels-last (1e-4), bfloat16 (region
embeddings with cosine >= 0.99 to float32)."""
import torch
from helpers import image_input, tiny_model

C4_GT = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml"
C4_RPN = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml"
BOXES = [[4, 4, 60, 50], [30, 20, 120, 90], [0, 0, 128, 96], [50, 10, 70, 40], [5, 60, 40, 95]]


def _detections(model, x):
    """Detections in a canonical order (class, then box), so that equal scores cannot reorder them."""
    inst = model(x)[0]["instances"]
    keys = [(int(c), *[round(v, 2) for v in b])
            for c, b in zip(inst.pred_classes.tolist(), inst.pred_boxes.tensor.tolist())]
    order = torch.tensor(sorted(range(len(keys)), key=lambda i: keys[i]), dtype=torch.long)
    return inst.pred_boxes.tensor[order], inst.scores[order], inst.pred_classes[order]


def test_chunked_res5_equals_all_at_once(tiny_clip_config):
    boxes = [[x0, y0, x0 + 30, y0 + 25] for x0 in range(0, 90, 15) for y0 in range(0, 60, 20)]
    x = [image_input(96, 128, boxes=boxes)]
    ref = _detections(tiny_model(C4_GT, tiny_clip_config, extra=["MODEL.CLIP.REGION_CHUNK_SIZE", 0]), x)
    got = _detections(tiny_model(C4_GT, tiny_clip_config, extra=["MODEL.CLIP.REGION_CHUNK_SIZE", 7]), x)
    assert len(ref[1]) >= len(boxes)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_channels_last_equals_plain(tiny_clip_config):
    x = [image_input(96, 128, boxes=BOXES)]
    ref = _detections(tiny_model(C4_GT, tiny_clip_config), x)
    got = _detections(tiny_model(C4_GT, tiny_clip_config, extra=["MODEL.CLIP.CHANNELS_LAST", True]), x)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_bfloat16_region_embeddings_close(tiny_clip_config):
    x = [image_input(96, 128, boxes=BOXES)]
    feats = {}
    for dtype in ("float32", "bfloat16"):
        model = tiny_model(C4_GT, tiny_clip_config, extra=["MODEL.CLIP.INFERENCE_DTYPE", dtype])
        captured = []
        pred = model.roi_heads.box_predictor
        orig = pred.forward
        pred.forward = lambda f, *a, _o=orig: (captured.append(f.float().clone()), _o(f, *a))[1]
        out = model(x)[0]["instances"]
        assert out.scores.dtype == torch.float32 and torch.isfinite(out.scores).all()
        feats[dtype] = captured[0]
    cos = torch.nn.functional.cosine_similarity(feats["float32"], feats["bfloat16"], dim=1)
    assert cos.min() >= 0.99, cos


def test_inference_tensors_do_not_leak_into_training(tiny_clip_config):
    """Vocabularies embedded lazily at inference can still be used by training."""
    from detectron2.utils.events import EventStorage

    model = tiny_model(C4_GT, tiny_clip_config)
    x = [image_input(96, 128, boxes=BOXES)]
    model(x)
    model.train()
    with EventStorage(0):
        losses = model(x)
    sum(losses.values()).backward()
