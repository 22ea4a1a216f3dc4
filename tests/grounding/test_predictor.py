"""The grounding head inside the CLIP detectors (MODEL.GROUNDING.ENABLED): C4 and FPN build,
train (token focal loss + box regression) and detect through the class prompt; a caption
replaces the vocabulary; scores equal the head's pieces computed by hand; fusion relates an
image's own regions only; bad input is named."""
import pytest
import torch
from helpers import image_input, tiny_cfg

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from regionclip_d2.grounding import GroundingPredictor, NoPhraseError
from regionclip_d2.grounding.head import class_scores

C4_GT = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml"
FPN_GT = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_FPN_zsinf_GT.yaml"


def grounding_model(config, tiny_clip_config, layers=1, extra=()):
    torch.manual_seed(0)
    cfg = tiny_cfg(config, tiny_clip_config, extra=["MODEL.GROUNDING.ENABLED", True, "MODEL.GROUNDING.FUSION_LAYERS",
                                                    layers, "MODEL.GROUNDING.ALIGN_DIM", 32,
                                                    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0] + list(extra))
    return build_model(cfg)


def test_gt_boxes_scores_are_the_heads_pieces_by_hand(tiny_clip_config):
    model = grounding_model(C4_GT, tiny_clip_config, layers=0).eval()
    pred = model.roi_heads.box_predictor
    assert isinstance(pred, GroundingPredictor)
    x = image_input(96, 128, boxes=[[4, 4, 60, 50], [30, 20, 120, 90]])
    out = model([x])[0]["instances"]
    assert len(out) > 0 and (out.pred_classes < 3).all()
    # by hand: embeddings of the boxes, alignment with the prompt's tokens, mean over each class's tokens
    (prompt,) = pred.prompts()
    assert prompt.caption == "cat. dog. ring."
    emb = model.roi_heads.box_predictor.embed(
        model.roi_heads.region_features(model.backbone(model.preprocess_image([x]).tensor),
                                        [x["instances"].gt_boxes]))
    feats = pred.token_encoder.encode_prompts([prompt])
    logits = pred.align(emb[None], feats["tokens"], feats["mask"])[0]
    probs = class_scores(logits, prompt.positive_map(), "mean")
    for box, score, cls in zip(out.pred_boxes.tensor, out.scores, out.pred_classes):
        i = int(torch.argmin((x["instances"].gt_boxes.tensor - box).abs().sum(dim=1)))
        assert score.item() == pytest.approx(probs[i, cls].item(), abs=1e-5)


@pytest.mark.parametrize("config", [C4_GT, FPN_GT])
def test_trains_with_token_focal_loss_and_detects(config, tiny_clip_config):
    model = grounding_model(config, tiny_clip_config).train()
    batch = [image_input(96, 128, boxes=[[4, 4, 60, 50], [30, 20, 120, 90]]),
             image_input(80, 64, boxes=[[10, 10, 50, 60]], seed=1)]
    batch[0]["instances"].gt_classes = torch.tensor([0, 2])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    with EventStorage(0):
        first = None
        for _ in range(12):
            losses = model(batch)
            assert set(losses) >= {"loss_grounding", "loss_box_reg"}
            loss = sum(losses.values())
            first = first if first is not None else loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert loss.item() < first  # it learns
    text = model.lang_encoder.token_embedding.weight
    assert not text.requires_grad  # the text tower is frozen by default
    model.eval()
    out = model(batch)
    assert all(torch.isfinite(o["instances"].scores).all() for o in out)


def test_caption_replaces_the_vocabulary(tiny_clip_config):
    model = grounding_model(C4_GT, tiny_clip_config).eval()
    phrases = model.roi_heads.box_predictor.set_caption("a red star next to the blue moon")
    assert phrases == ["red star", "blue moon"]
    x = image_input(96, 128, boxes=[[4, 4, 60, 50], [30, 20, 120, 90]])
    out = model([x])[0]["instances"]
    assert len(out) > 0 and (out.pred_classes < 2).all()  # classes are the caption's phrases
    with pytest.raises(NoPhraseError):
        model.roi_heads.box_predictor.set_caption("   ")
    model.roi_heads.box_predictor.set_caption(None)
    assert (model([x])[0]["instances"].pred_classes < 3).all()


def test_fusion_relates_an_images_own_regions_only(tiny_clip_config):
    """With fusion, an image's scores do not depend on the other images of the batch."""
    model = grounding_model(C4_GT, tiny_clip_config, layers=2).eval()
    pred = model.roi_heads.box_predictor
    for layer in pred.deep_fusion.layers:  # make fusion matter
        torch.nn.init.ones_(layer.gamma_v)
        torch.nn.init.ones_(layer.gamma_t)
    a = image_input(96, 128, boxes=[[4, 4, 60, 50], [30, 20, 120, 90]])
    b = image_input(96, 128, boxes=[[0, 0, 90, 90]], seed=2)
    c = image_input(96, 128, boxes=[[10, 30, 40, 80], [50, 5, 120, 60]], seed=3)
    emb = torch.randn(5, 64)
    (prompt,) = pred.prompts()
    together = pred.token_logits(emb, [2, 3], prompt)
    assert torch.allclose(together[:2], pred.token_logits(emb[:2], [2], prompt), atol=1e-5)
    assert torch.allclose(together[2:], pred.token_logits(emb[2:], [3], prompt), atol=1e-5)
    assert not torch.allclose(together[:2], pred.token_logits(emb[:2], [1, 1], prompt), atol=1e-4)
    scores = [model([x])[0]["instances"].scores.sort().values for x in (a, b, c)]
    both = model([a, b, c])
    for s, o in zip(scores, both):
        assert torch.allclose(o["instances"].scores.sort().values, s, atol=1e-5)


def test_bad_input_is_named(tiny_clip_config):
    with pytest.raises(ValueError, match="TEXT_DIM"):
        grounding_model(C4_GT, tiny_clip_config, extra=["MODEL.GROUNDING.TEXT_DIM", 32])
    with pytest.raises(ValueError, match="REDUCE"):
        grounding_model(C4_GT, tiny_clip_config, extra=["MODEL.GROUNDING.REDUCE", "sum"])
    model = grounding_model(C4_GT, tiny_clip_config).eval()
    model.set_vocabulary(torch.randn(3, 64))  # embeddings without names: no prompt can be built
    with pytest.raises(ValueError, match="needs class names"):
        model([image_input(96, 128, boxes=[[4, 4, 60, 50]])])


def test_training_logs_the_heads_real_accuracy(tiny_clip_config):
    """detectron2's fast_rcnn/* accuracy stats come from the class probabilities of the token
    logits (background when no class reaches 0.5), not from placeholders."""
    from detectron2.structures import Boxes, Instances

    pred = grounding_model(C4_GT, tiny_clip_config).roi_heads.box_predictor
    (prompt,) = pred.prompts()
    pm = prompt.positive_map()  # [3 classes, T]
    props = Instances((64, 64), proposal_boxes=Boxes(torch.tensor([[0.0, 0, 10, 10]] * 3)),
                      gt_boxes=Boxes(torch.tensor([[0.0, 0, 10, 10]] * 3)), gt_classes=torch.tensor([1, 1, 3]))
    deltas = torch.zeros(3, 4)
    for logits, acc, fg_acc, fn in ((torch.where(pm[1] > 0, 8.0, -8.0).expand(3, -1), 2 / 3, 1.0, 0.0),
                                    (torch.full((3, pm.shape[1]), -8.0), 1 / 3, 0.0, 1.0)):
        with EventStorage(0) as storage:
            pred.losses((logits.clone(), deltas), [props])
            assert storage.latest()["fast_rcnn/cls_accuracy"][0] == pytest.approx(acc)
            assert storage.latest()["fast_rcnn/fg_cls_accuracy"][0] == pytest.approx(fg_acc)
            assert storage.latest()["fast_rcnn/false_negative"][0] == pytest.approx(fn)
