"""A baseline that stands for the official RegionCLIP code's compute at zero-shot inference.

The official implementation runs, for one image (batch 1, fp32, plain module calls):

1. in RPN mode the offline RPN branch (an R50-FPN backbone and detectron2's RPN);
2. the CLIP ResNet from the stem to res4 on the whole image;
3. RoIAlign (v2, 14x14) of all regions at once, torchvision's single-threaded CPU kernel;
4. res5 (``layer4``) on all regions at once;
5. CLIP's attention pool as CLIP defines it: multi-head attention with all 50 tokens as
   queries (the mean token and the 7x7 grid), of which only the first output is kept;
6. the cosine classifier against the text embeddings, the zero background column, /0.01,
   softmax; in RPN mode the objectness fusion;
7. detectron2's ``fast_rcnn_inference``: score threshold, per-class NMS over every
   candidate above it, top 100; boxes rescaled to the input size.

:func:`official_inference` does exactly that with the detector's own modules and weights, so
that its detections can be checked equal to the detector's (:func:`compare_detections`) and
its time, measured alternately with the detector's in one process, is the denominator of the
speed-ups ``bench/run.py`` reports. It is our own rendering of that algorithm, not the
official code: the official code cannot be installed here (it is a fork of detectron2).

:func:`count_flops` counts the multiply-adds of the convolutions, linear layers and the
attention pool per stage; :func:`machine_peak` measures this CPU's fp32 rate on one large
convolution and one large matrix product, the practical ceiling for the backbones.
"""
import time
from copy import deepcopy as copy_module
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn


class _Clock:
    def __init__(self):
        self.t: Dict[str, float] = {}

    def __call__(self, name: str, fn: Callable, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
        return out


def _plain_roi_align(model):
    """The single-threaded detectron2 ROIAlign inside the detector's (threaded) pooler."""
    level = model.roi_heads.pooler.level_poolers[0]
    return getattr(level, "inner", level)


def _plain_clip_resnet(model):
    """The detector's CLIP ResNet in the default (contiguous) memory format: the module itself,
    or with ``MODEL.CLIP.CHANNELS_LAST`` a contiguous copy (made once)."""
    res = model.clip_resnet
    if not getattr(model, "channels_last", False):
        return res
    copy = model.__dict__.get("_official_compute_resnet")
    if copy is None:
        copy = copy_module(res).to(memory_format=torch.contiguous_format)
        model.__dict__["_official_compute_resnet"] = copy
    return copy


def _fuse(probs: torch.Tensor, obj: Optional[torch.Tensor], fusion: str) -> torch.Tensor:
    if obj is None or fusion == "none":
        return probs
    obj = obj.float()[:, None]
    return torch.sqrt(torch.sigmoid(obj) * probs) if fusion == "geometric" else torch.sqrt(obj * probs)


def official_inference(model, inputs: List[Dict], clock: Optional[_Clock] = None) -> List[Dict]:
    """The official algorithm on ``inputs`` (one image, as for ``model(inputs)``) with
    ``model``'s modules (an RN50-C4 ``CLIPFastRCNN`` in eval mode, GT or RPN regions).
    Returns detectron2-style outputs; ``clock`` (optional) collects the time per stage."""
    from detectron2.layers import batched_nms
    from detectron2.modeling.postprocessing import detector_postprocess
    from detectron2.structures import Boxes, Instances

    clock = clock or _Clock()
    if len(inputs) != 1:
        raise ValueError("the official-compute baseline runs batch 1")
    x = inputs[0]
    pred = model.roi_heads.box_predictor
    if not pred.no_box_delta:
        raise ValueError("the official-compute baseline is zero-shot inference: set MODEL.CLIP.NO_BOX_DELTA True")
    with torch.inference_mode():
        if model.region_type == "GT":
            boxes = x["instances"].gt_boxes.tensor.float()
            obj = None
        else:
            def rpn():
                off = model.offline_preprocess_image(inputs)
                feats = type(model.offline_backbone).forward(model.offline_backbone, off.tensor)
                return model.offline_proposal_generator(off, feats, None)[0][0]

            props = clock("rpn_branch", rpn)
            boxes, obj = props.proposal_boxes.tensor, props.objectness_logits
        images = model.preprocess_image(inputs)
        res = _plain_clip_resnet(model)
        image = images.tensor.contiguous()
        feat = clock("backbone_res4", lambda: type(res).forward(res, image)["res4"])
        rois = torch.cat([torch.zeros(len(boxes), 1), boxes], dim=1)
        pooled = clock("roialign", _plain_roi_align(model), feat, rois)
        res5 = clock("res5", res.layer4, pooled)
        # open_clip's AttentionPool2d.forward: F.multi_head_attention_forward over all tokens
        emb = clock("attnpool", type(res.attnpool).forward, res.attnpool, res5)

        def classify():
            text = F.normalize(pred.cls_score.embeddings().float(), dim=-1)
            logits = F.normalize(emb, dim=-1) @ text.t()
            logits = torch.cat([logits, torch.zeros(len(logits), 1)], dim=1) / pred.cls_score.temperature
            return _fuse(F.softmax(logits, dim=-1), obj, pred.fusion)

        probs = clock("classifier", classify)

        def postprocess():  # detectron2's fast_rcnn_inference_single_image, NMS over every candidate
            size = images.image_sizes[0]
            b, s = boxes, probs
            valid = torch.isfinite(s).all(dim=1)
            b, s = b[valid], s[valid][:, :-1]
            bb = Boxes(b.clone())
            bb.clip(size)
            mask = s > pred.test_score_thresh
            idx = mask.nonzero()
            cand_boxes, cand_scores = bb.tensor[idx[:, 0]], s[mask]
            keep = batched_nms(cand_boxes, cand_scores, idx[:, 1], pred.test_nms_thresh)[:pred.test_topk_per_image]
            r = Instances(size)
            r.pred_boxes = Boxes(cand_boxes[keep])
            r.scores = cand_scores[keep]
            r.pred_classes = idx[keep, 1]
            return [{"instances": detector_postprocess(r, x.get("height", size[0]), x.get("width", size[1]))}]

        return clock("postprocess", postprocess)


def compare_detections(a: List[Dict], b: List[Dict], score_tol: float = 1e-4, box_tol: float = 1e-2) -> Dict:
    """How far two detectors' outputs for the same images are apart: the share of ``a``'s
    detections that ``b`` has too (same class, box within ``box_tol`` px, score within
    ``score_tol``) and the largest score difference among those matched."""
    matched = total = 0
    worst = 0.0
    for x, y in zip(a, b):
        ia, ib = x["instances"], y["instances"]
        total += len(ia)
        if not len(ia) or not len(ib):
            continue
        same_cls = ia.pred_classes[:, None] == ib.pred_classes[None, :]
        box_d = (ia.pred_boxes.tensor[:, None, :] - ib.pred_boxes.tensor[None, :, :]).abs().amax(-1)
        score_d = (ia.scores[:, None] - ib.scores[None, :]).abs()
        ok = same_cls & (box_d <= box_tol) & (score_d <= score_tol)
        hit = ok.any(dim=1)
        matched += int(hit.sum())
        if hit.any():
            worst = max(worst, float(torch.where(ok, score_d, torch.full_like(score_d, float("inf")))
                                     .amin(dim=1)[hit].max()))
    return {"detections": total, "matched": matched, "share": matched / total if total else 1.0,
            "max_score_diff": worst}


# ----------------------------------------------------------------------------- FLOPs
def _conv_linear_macs(module: nn.Module, run: Callable) -> float:
    """Multiply-adds of every Conv2d and Linear called inside ``module`` during ``run()``."""
    macs = [0.0]

    def conv_hook(m, inp, out):
        macs[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, inp, out):
        macs[0] += out.numel() * m.in_features

    handles = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
               for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    return macs[0]


def attnpool_macs(attnpool, regions: int, tokens: int, all_queries: bool) -> float:
    """Multiply-adds of the attention pool on ``regions`` maps of ``tokens`` (= HW + 1) tokens:
    all queries (CLIP's form: q/k/v projections of every token, L x L attention) or the one
    kept query with keys and values moved to its side (the detector's form)."""
    c = attnpool.q_proj.in_features
    out = attnpool.c_proj.out_features
    heads = attnpool.num_heads
    if all_queries:
        per = 3 * tokens * c * c + 2 * tokens * tokens * c + c * out
    else:
        per = c * c + heads * (c // heads) * c + 2 * heads * tokens * c + heads * c * (c // heads) + c * out
    return float(regions * per)


def count_flops(model, inputs: List[Dict], regions: int) -> Dict[str, float]:
    """GFLOP (2 x multiply-adds of the convolutions and linear layers) per stage of one
    zero-shot image: ``rpn_branch`` (its backbone), ``backbone_res4``, ``res5`` and
    ``attnpool`` (official form) for ``regions`` regions, ``attnpool_one_query`` (the
    detector's form). Normalisations, activations, pooling and the RPN head are left out."""
    out = {}
    res = model.clip_resnet
    with torch.inference_mode():
        images = model.preprocess_image(inputs)
    out["backbone_res4"] = _conv_linear_macs(res, lambda: type(res).forward(res, images.tensor))
    if model.offline_backbone is not None:
        off = model.offline_preprocess_image(inputs)
        out["rpn_branch"] = _conv_linear_macs(model.offline_backbone, lambda: model.offline_backbone(off.tensor))
    c4 = res.layer3[-1].conv3.out_channels
    side = model.roi_heads.pooler.output_size[0]  # 14 for RN50
    one = torch.zeros(1, c4, side, side)
    out["res5"] = regions * _conv_linear_macs(res.layer4, lambda: res.layer4(one))
    tokens = (side // 2) ** 2 + 1  # res5 halves the grid; plus the mean token
    out["attnpool"] = attnpool_macs(res.attnpool, regions, tokens, all_queries=True)
    out["attnpool_one_query"] = attnpool_macs(res.attnpool, regions, tokens, all_queries=False)
    return {k: 2 * v / 1e9 for k, v in out.items()}


def machine_peak(threads: int, repeats: int = 5) -> Dict[str, float]:
    """This CPU's fp32 GFLOP/s at ``threads`` threads: a 3x3 convolution as in res4 (256 ->
    256 channels on a 50x84 map, batch 4) and a 2048^3 matrix product; best of ``repeats``."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, 50, 84, generator=g)
    w = torch.randn(256, 256, 3, 3, generator=g)
    a = torch.randn(2048, 2048, generator=g)
    b = torch.randn(2048, 2048, generator=g)

    def best(fn, flop):
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return flop / min(ts) / 1e9

    with torch.inference_mode():
        conv = best(lambda: F.conv2d(x, w, padding=1), 2.0 * 4 * 256 * 50 * 84 * 256 * 9)
        mm = best(lambda: a @ b, 2.0 * 2048 ** 3)
    return {"conv_gflops": conv, "matmul_gflops": mm}
