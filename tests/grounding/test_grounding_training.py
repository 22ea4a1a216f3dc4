"""Grounding data end to end: the mapper's phrases (flip swaps left and right), per-image
prompts in training (token targets from each box's phrase, withheld words left out, checked
against a hand computation) and at inference (each image's classes are its own phrases),
the text-embedding classifier as the grounding baseline, and phrase recall as an evaluator."""
import json

import numpy as np
import pytest
import torch
from helpers import image_input, tiny_cfg
from PIL import Image
from torchvision.ops import sigmoid_focal_loss

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from regionclip_d2.evaluation.evaluators import build_evaluator
from regionclip_d2.evaluation.grounding_recall import GroundingEvaluator
from regionclip_d2.grounding.data import register_grounding_dataset
from regionclip_d2.grounding.head import class_scores
from regionclip_d2.grounding.mapper import GroundingDatasetMapper, grounding_phrases, swap_left_right
from regionclip_d2.grounding.prompts import grounded_prompt

C4_GT = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml"


def model_of(tiny_clip_config, grounding=True, extra=()):
    torch.manual_seed(0)
    opts = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0]
    if grounding:
        opts += ["MODEL.GROUNDING.ENABLED", True, "MODEL.GROUNDING.FUSION_LAYERS", 1, "MODEL.GROUNDING.ALIGN_DIM", 32]
    opts += list(extra)
    return build_model(tiny_cfg(C4_GT, tiny_clip_config, extra=opts))


def test_flip_swaps_left_and_right_and_moves_the_spans():
    cap = "a red star to the left of two moons, Right?"
    spans = [[[0, 10]], [[26, 35]], [[37, 42]]]
    new, moved = swap_left_right(cap, spans)
    assert new == "a red star to the right of two moons, Left?"
    assert [new[a:b] for (a, b), in moved] == ["a red star", "two moons", "Left"]
    back, again = swap_left_right(new, moved)
    assert back == cap and again == spans
    assert swap_left_right("leftover bright", [[[0, 8]]]) == ("leftover bright", [[[0, 8]]])  # whole words only


def _grounding_dict(path):
    Image.fromarray(np.full((60, 80, 3), 128, np.uint8)).save(path)
    cap = "two stars to the left of a moon"
    return {"file_name": str(path), "height": 60, "width": 80, "image_id": 7, "caption": cap,
            "tokens_withheld": [[25, 31]],
            "annotations": [
                {"bbox": [10, 10, 20, 20], "bbox_mode": 1, "category_id": 3, "tokens_positive": [[0, 9]]},
                {"bbox": [40, 5, 0, 10], "bbox_mode": 1, "category_id": 3, "tokens_positive": [[0, 9]]},  # empty
                {"bbox": [45, 30, 20, 20], "bbox_mode": 1, "category_id": 3, "tokens_positive": [[0, 9]]},
                {"bbox": [5, 40, 10, 10], "bbox_mode": 1, "category_id": 5, "tokens_positive": [[17, 21], [0, 3]]}]}


def test_mapper_gives_phrases_in_evaluation_order_and_survives_flip_and_filtering(tmp_path):
    d = _grounding_dict(tmp_path / "a.png")
    phrases, _ = grounding_phrases(d)
    assert phrases == [[[0, 9]], [[17, 21], [0, 3]]]  # sorted by first span, as phrase_targets orders them
    mapper = GroundingDatasetMapper(is_train=True, augmentations=[T.RandomFlip(prob=1.0)], image_format="RGB")
    out = mapper(d)
    g = out["grounding"]
    assert g["caption"] == "two stars to the right of a moon"
    assert [[g["caption"][a:b] for a, b in p] for p in g["phrases"]] == [["two stars"], ["right", "two"]]
    assert [g["caption"][a:b] for a, b in g["ignore"]] == ["a moon"]
    inst = out["instances"]
    assert inst.gt_phrases.tolist() == [0, 0, 1]  # the empty box is gone with its phrase index
    assert inst.gt_classes.tolist() == [0, 0, 0]
    assert inst.gt_boxes.tensor[0].tolist() == [50.0, 10.0, 70.0, 30.0]  # flipped
    assert d["annotations"][0]["category_id"] == 3  # the input dict is untouched
    test = GroundingDatasetMapper(is_train=False, augmentations=[], image_format="RGB")(d)
    assert "instances" not in test and test["grounding"]["caption"] == d["caption"]


def test_training_targets_and_loss_by_hand(tiny_clip_config):
    model = model_of(tiny_clip_config).train()
    pred = model.roi_heads.box_predictor
    enc = pred.token_encoder
    g0 = {"caption": "two stars to the left of a moon", "phrases": [[[0, 9]]], "ignore": [[25, 31]]}
    groundings = [g0, None]  # image 1: detection data through the class prompt "cat. dog. ring."
    pred.set_batch_groundings(groundings)
    props = []
    for n, (classes, phr) in enumerate([([0, 0, 2], [0, 0, 0]), ([1, 3, 2], None)]):
        p = Instances((60, 80), proposal_boxes=Boxes(torch.rand(3, 4) * 20 + torch.tensor([0, 0, 30, 30])),
                      gt_boxes=Boxes(torch.rand(3, 4) * 20 + torch.tensor([0, 0, 30, 30])),
                      gt_classes=torch.tensor(classes))
        if phr is not None:
            p.gt_phrases = torch.tensor(phr)
        props.append(p)
    T_ = enc.context_length
    logits = torch.randn(6, T_, generator=torch.Generator().manual_seed(0))
    losses = pred.losses((logits, torch.zeros(6, 4)), props)
    # by hand: image 0's boxes of class 0 target "two stars"; the region of class 2 (background for
    # grounding data) and every padding or withheld token target nothing; image 1 uses the class prompt
    p0 = grounded_prompt(g0["caption"], g0["phrases"], enc.encoder.tokenizer, T_, g0["ignore"])
    (cp,) = pred.prompts()
    targets = torch.zeros(6, T_)
    targets[0, p0.token_spans[0][0]:p0.token_spans[0][1]] = 1
    targets[1] = targets[0]
    targets[3, cp.token_spans[1][0]:cp.token_spans[1][1]] = 1  # class 1 = dog; class 3 is background
    targets[5, cp.token_spans[2][0]:cp.token_spans[2][1]] = 1
    mask = torch.zeros(6, T_, dtype=torch.bool)
    mask[:3, :p0.num_positions] = True
    mask[:3, p0.ignore_positions] = False
    mask[3:, :cp.num_positions] = True
    assert len(p0.ignore_positions) == 2 and p0.ignore_positions[0] >= p0.token_spans[0][1]
    focal = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none")
    assert losses["loss_grounding"].item() == pytest.approx((focal * mask).sum().item() / 4, rel=1e-5)
    assert losses["loss_box_reg"].item() > 0  # the four foreground regions regress


def test_a_detector_without_the_grounding_head_refuses_grounding_data_in_training(tiny_clip_config):
    model = model_of(tiny_clip_config, grounding=False).train()
    x = image_input(96, 128, boxes=[[4, 4, 60, 50]])
    x["grounding"] = {"caption": "a cat", "phrases": [[[0, 5]]], "ignore": []}
    with pytest.raises(ValueError, match="MODEL.GROUNDING.ENABLED"):
        model([x])


def test_each_image_is_scored_against_its_own_caption(tiny_clip_config):
    model = model_of(tiny_clip_config).eval()
    pred = model.roi_heads.box_predictor
    xs = [image_input(96, 128, boxes=[[4, 4, 60, 50], [30, 20, 120, 90]]),
          image_input(80, 64, boxes=[[10, 10, 50, 60]], seed=1)]
    xs[0]["grounding"] = {"caption": "a cat next to a big dog", "phrases": [[[0, 5]], [[14, 23]]]}
    xs[1]["grounding"] = {"caption": "one ring", "phrases": [[[0, 8]]]}
    both = model(xs)
    for i, x in enumerate(xs):
        alone = model([x])[0]["instances"]
        out = both[i]["instances"]
        assert torch.allclose(out.scores, alone.scores, atol=1e-5) and len(out) > 0
        assert (out.pred_classes < len(x["grounding"]["phrases"])).all()
        # by hand: the image's regions against its own prompt (C4, GT boxes, fusion of this image only)
        prompt = pred.grounding_prompt(x["grounding"])
        with torch.no_grad():
            feats = model.backbone(model.preprocess_image([x]).tensor)
            emb = pred.embed(model.roi_heads.region_features(feats, [x["instances"].gt_boxes]))
            tok = pred.token_encoder.encode_prompts([prompt])
            v, t = pred.deep_fusion(emb[None], tok["tokens"], tok["mask"])
            probs = class_scores(pred.align(v, t, tok["mask"])[0], prompt.positive_map(), "mean")
        for box, score, cls in zip(out.pred_boxes.tensor, out.scores, out.pred_classes):
            r = int(torch.argmin((x["instances"].gt_boxes.tensor - box).abs().sum(dim=1)))
            assert score.item() == pytest.approx(probs[r, cls].item(), abs=1e-5)
    assert pred._batch is None  # the batch's prompts do not outlive the call
    assert model([image_input(96, 128, boxes=[[4, 4, 60, 50]])])[0]["instances"].pred_classes.max() < 3


def test_classifier_baseline_is_the_phrases_as_vocabulary(tiny_clip_config):
    model = model_of(tiny_clip_config, grounding=False).eval()
    names_before = list(model.class_names)
    x = image_input(96, 128, boxes=[[4, 4, 60, 50], [30, 20, 120, 90]])
    x["grounding"] = {"caption": "a cat next to a big dog", "phrases": [[[0, 5]], [[14, 23]]]}
    out = model([x])[0]["instances"]
    assert model.class_names == names_before  # the vocabulary comes back
    plain = {k: v for k, v in x.items() if k != "grounding"}
    model.set_vocabulary(["a cat", "a big dog"])
    ref = model([plain])[0]["instances"]
    assert torch.equal(out.pred_classes, ref.pred_classes) and torch.allclose(out.scores, ref.scores, atol=1e-6)


def _outputs(h, w, boxes, scores, classes):
    inst = Instances((h, w), pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)),
                     scores=torch.tensor(scores, dtype=torch.float32), pred_classes=torch.tensor(classes))
    return {"instances": inst}


def test_evaluator_recall_by_hand(tmp_path):
    for i in (1, 2):
        Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(tmp_path / f"{i}.png")
    data = {"images": [{"id": 1, "file_name": "1.png", "height": 50, "width": 50, "caption": "a star and two moons"},
                       {"id": 2, "file_name": "2.png", "height": 50, "width": 50, "caption": "a star"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "tokens_positive": [[0, 6]]},
                {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20, 20, 10, 10], "tokens_positive": [[11, 20]]},
                {"id": 3, "image_id": 1, "category_id": 2, "bbox": [30, 30, 10, 10], "tokens_positive": [[11, 20]]},
                {"id": 4, "image_id": 2, "category_id": 1, "bbox": [5, 5, 20, 20], "tokens_positive": [[0, 6]]}],
            "categories": [{"id": 1, "name": "star", "split": "base"}, {"id": 2, "name": "moon", "split": "novel"}]}
    path = tmp_path / "g.json"
    path.write_text(json.dumps(data))
    name = register_grounding_dataset("test_grounding_recall_eval", str(path), str(tmp_path))
    try:
        ev = build_evaluator(tiny_eval_cfg(tmp_path), name)
        assert isinstance(ev, GroundingEvaluator)
        ev.reset()
        # image 1: "a star" found by its 2nd box; "two moons" (union [20, 20, 40, 40]) found by its 1st
        ev.process([{"image_id": 1}], [_outputs(50, 50, [[30, 30, 40, 40], [0, 0, 10, 10], [20, 20, 40, 40]],
                                                [0.9, 0.5, 0.4], [0, 0, 1])])
        ev.process([{"image_id": 2}], [_outputs(50, 50, [[30, 30, 45, 45]], [0.8], [0])])  # a miss
        res = ev.evaluate()["grounding"]
        assert res["R@1"] == pytest.approx(100 / 3) and res["R@5"] == pytest.approx(200 / 3)
        assert res["R@1-novel"] == 100.0 and res["R@5-base"] == 50.0 and res["phrases-novel"] == 1
        rows = json.loads((tmp_path / "inference" / name / "grounding_phrases.json").read_text())
        assert [r["rank"] for r in rows] == [1, 0, None] and rows[1]["phrase"] == "two moons"
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def tiny_eval_cfg(tmp_path):
    from regionclip_d2 import get_regionclip_cfg

    cfg = get_regionclip_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    return cfg


def test_detection_and_grounding_data_train_together(tmp_path):
    """DATASETS.TRAIN may join detection data (its own class list) and grounding data (any
    categories): both come in, and the mapper gives captions only to the grounding dicts."""
    from helpers import make_coco

    from regionclip_d2 import get_regionclip_cfg
    from regionclip_d2.data.datasets import register_coco_format
    from regionclip_d2.engine.trainer import training_dataset_dicts

    det_json, det_root = make_coco(tmp_path / "det", n_images=3)
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(tmp_path / "g.png")
    (tmp_path / "g.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "g.png", "height": 50, "width": 50, "caption": "a star"}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 20, 20],
                          "tokens_positive": [[0, 6]]}],
         "categories": [{"id": 7, "name": "star"}]}))
    names = [register_coco_format("mix_det", str(det_json), str(det_root)),
             register_grounding_dataset("mix_grounding", str(tmp_path / "g.json"), str(tmp_path))]
    try:
        cfg = get_regionclip_cfg()
        cfg.DATASETS.TRAIN = tuple(names)
        dicts = training_dataset_dicts(cfg, filter_empty=True)
        assert len(dicts) == 4 and ["caption" in d for d in dicts] == [False, False, False, True]
        mapper = GroundingDatasetMapper(is_train=True, augmentations=[], image_format="RGB")
        mapped = [mapper(d) for d in dicts]
        assert ["grounding" in m for m in mapped] == [False, False, False, True]
        assert mapped[3]["instances"].gt_phrases.tolist() == [0] and not mapped[0]["instances"].has("gt_phrases")
        cfg.MODEL.LOAD_PROPOSALS = True
        with pytest.raises(ValueError, match="grounding data sets"):
            training_dataset_dicts(cfg, filter_empty=True)
    finally:
        for n in names:
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)


def test_last_token_scores_by_hand():
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0, 0.5]])
    pm = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 1, 1.0]])
    torch.testing.assert_close(class_scores(logits, pm, "last"), torch.sigmoid(torch.tensor([[-1.0, 0.5]])))


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_phrase_embeddings_are_each_phrase_read_alone(tiny_clip_config, mode):
    """PHRASE_EMBEDDINGS: a phrase's tokens carry (add) or are (replace) the text tower's
    end-of-text output for the phrase alone; ALIGN_INIT identity starts the alignment as the
    cosine of region and token features."""
    model = model_of(tiny_clip_config, extra=["MODEL.GROUNDING.PHRASE_EMBEDDINGS", mode, "MODEL.GROUNDING.ALIGN_INIT",
                                              "identity", "MODEL.GROUNDING.ALIGN_DIM", 0,
                                              "MODEL.GROUNDING.FUSION_LAYERS", 0]).eval()
    pred = model.roi_heads.box_predictor
    enc = pred.token_encoder
    g = {"caption": "a cat next to a big dog", "phrases": [[[0, 5]], [[14, 23]]]}
    prompt = pred.grounding_prompt(g)
    phr = pred.phrase_token_embeddings([prompt])[0]
    alone = enc(enc.encoder.tokenizer(["a cat", "a big dog"])[:, :enc.context_length])["eot"]
    a, b = prompt.token_spans[1]
    torch.testing.assert_close(phr[a:b], alone[1].expand(b - a, -1))
    assert phr[prompt.token_spans[0][1]:a].abs().sum() == 0  # "next to": no phrase
    # identity start: logits = scale * cos(region, token) + bias, with the phrase's tokens as the mode says
    emb = torch.randn(3, enc.embed_dim)
    logits = pred.token_logits(emb, [3], [prompt])
    tok = enc.encode_prompts([prompt])
    t = tok["tokens"][0] + phr if mode == "add" else torch.where(phr.abs().sum(-1, keepdim=True) > 0, phr,
                                                                  tok["tokens"][0])
    cos = torch.nn.functional.cosine_similarity(emb[:, None], t[None], dim=-1)
    expect = cos * pred.align.log_scale.exp() + pred.align.bias
    n = prompt.num_positions
    torch.testing.assert_close(logits[:, :n], expect[:, :n], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="ALIGN_DIM"):
        model_of(tiny_clip_config, extra=["MODEL.GROUNDING.ALIGN_INIT", "identity", "MODEL.GROUNDING.ALIGN_DIM", 32])
    with pytest.raises(ValueError, match="PHRASE_EMBEDDINGS"):
        model_of(tiny_clip_config, extra=["MODEL.GROUNDING.PHRASE_EMBEDDINGS", "sum"])


def test_phrase_embeddings_follow_new_text_weights(tiny_clip_config):
    model = model_of(tiny_clip_config, extra=["MODEL.GROUNDING.PHRASE_EMBEDDINGS", "replace"]).eval()
    pred = model.roi_heads.box_predictor
    prompt = pred.grounding_prompt({"caption": "a cat", "phrases": [[[0, 5]]]})
    before = pred.phrase_token_embeddings([prompt]).clone()
    sd = {k: v + 0.1 for k, v in model.state_dict().items() if k.startswith("lang_encoder.") and v.is_floating_point()}
    model.load_state_dict(sd, strict=False)
    after = pred.phrase_token_embeddings([prompt])
    assert not torch.allclose(before, after)  # embedded again with the new weights, not served from the cache


def test_the_f_vit_detector_trains_and_grounds_with_the_head(tiny_vit_config):
    """The grounding head on the CLIPSelf ViT's detector (F-ViT): captions train it and
    each image is scored against its own phrases."""
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    cfg = tiny_cfg("configs/clipself/FViT_ViT-B-16_ovd.yaml", tiny_vit_config,
                   extra=["MODEL.CLIP.TEXT_EMB_DIM", 24, "MODEL.GROUNDING.ENABLED", True,
                          "MODEL.GROUNDING.ALIGN_DIM", 0, "MODEL.GROUNDING.FUSION_HEADS", 4,
                          "MODEL.GROUNDING.PHRASE_EMBEDDINGS", "replace",
                          "MODEL.GROUNDING.ALIGN_INIT", "identity", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
                          "MODEL.CLIP.CROP_REGION_TYPE", "GT"])
    model = build_model(cfg).train()
    x = image_input(96, 128, boxes=[[4, 4, 60, 50], [30, 20, 120, 90]])
    x["instances"].gt_phrases = torch.tensor([0, 1])
    x["grounding"] = {"caption": "a cat next to a big dog", "phrases": [[[0, 5]], [[14, 23]]], "ignore": []}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    with EventStorage(0):
        first = sum(model([x]).values()).item()
        for _ in range(8):
            loss = sum(model([x]).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert loss.item() < first
    out = model.eval()([x])[0]["instances"]
    assert len(out) > 0 and (out.pred_classes < 2).all()
