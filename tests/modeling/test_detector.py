"""CLIPFastRCNN: configs, predictor maths, score fusion, vocabularies, checkpoints,
DefaultPredictor and bad inputs."""
import glob
import os

import numpy as np
import pytest
import torch
from helpers import image_input, tiny_cfg, tiny_model

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultPredictor
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from regionclip_d2 import get_regionclip_cfg
from regionclip_d2.modeling.roi_heads import NoVocabularyError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DETECTOR_CONFIGS = sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
C4_GT = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml"
C4_RPN = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml"


@pytest.mark.parametrize("config", DETECTOR_CONFIGS)
def test_every_config_builds_and_runs(config, tiny_clip_config, tiny_vit_config):
    cfg = get_regionclip_cfg(config)
    if cfg.MODEL.META_ARCHITECTURE == "ProposalNetwork":  # the RPN branch's own configs

        cfg.MODEL.DEVICE = "cpu"
        rpn = build_model(cfg).eval()
        with torch.no_grad():
            out = rpn([image_input(96, 128), image_input(40, 50, seed=1)])
        assert len(out) == 2 and len(out[0]["proposals"]) > 0
        return
    if cfg.MODEL.META_ARCHITECTURE == "PretrainFastRCNN":
        from test_pretrain import batch, pretrain_cfg

        torch.manual_seed(0)
        model = build_model(pretrain_cfg(tiny_clip_config, "RPN", base=config))
        model.set_concept_pool(torch.randn(9, 64))
        model.train()
        from detectron2.utils.events import EventStorage

        with EventStorage(0):
            losses = model(batch())
        assert all(torch.isfinite(v) for v in losses.values())
        return
    if cfg.MODEL.META_ARCHITECTURE == "CLIPSelf":  # the real ViT's recipe on the tiny ViT
        from test_clipself import clipself_cfg

        torch.manual_seed(0)
        model = build_model(clipself_cfg(tiny_vit_config, base=config)).train()
        losses = model([image_input(96, 128), image_input(40, 50, seed=1)])
        assert set(losses) == {"loss_clipself"} and torch.isfinite(losses["loss_clipself"])
        return
    if cfg.MODEL.META_ARCHITECTURE != "CLIPFastRCNN":
        pytest.fail(f"{config}: unexpected meta-architecture {cfg.MODEL.META_ARCHITECTURE}")
    extra = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0]
    if "vit" in cfg.MODEL.BACKBONE.NAME:  # a ViT detector (F-ViT style): the tiny ViT, its 24-d joint space
        model = tiny_model(config, tiny_vit_config, extra=extra + ["MODEL.CLIP.TEXT_EMB_DIM", 24])
    else:
        model = tiny_model(config, tiny_clip_config, extra=extra)
    inputs = [image_input(96, 128, boxes=[[4, 4, 60, 50], [30, 20, 120, 90], [0, 0, 128, 96]]),
              image_input(80, 64, boxes=[], seed=1)]
    out = model(inputs)
    assert len(out) == 2
    for o, x in zip(out, inputs):
        inst = o["instances"]
        assert inst.image_size == (x["height"], x["width"])
        assert torch.isfinite(inst.scores).all()
        assert (inst.pred_classes >= 0).all() and (inst.pred_classes < 3).all()
    if cfg.MODEL.CLIP.CROP_REGION_TYPE == "GT":
        assert len(out[0]["instances"]) > 0 and len(out[1]["instances"]) == 0


def test_logits_by_hand_and_zero_background(tiny_clip_config):
    model = tiny_model(C4_GT, tiny_clip_config)
    pred = model.roi_heads.box_predictor
    emb = torch.randn(3, 64)
    pred.test_vocabulary.set(emb)
    x = torch.randn(5, 64)
    logits, deltas = pred(x)
    expected = torch.nn.functional.cosine_similarity(x[:, None], emb[None], dim=-1) / 0.01
    torch.testing.assert_close(logits[:, :3], expected, atol=1e-4, rtol=1e-5)
    assert (logits[:, 3] == 0).all()  # background: all-zero embedding, appended last
    assert deltas.shape == (5, 4)  # class-agnostic regression


def _fake_proposals(logits):
    p = Instances((100, 100))
    n = len(logits)
    p.proposal_boxes = Boxes(torch.tensor([[10.0 * i, 0, 10.0 * i + 9, 9] for i in range(n)]))
    p.objectness_logits = torch.tensor(logits)
    return p


@pytest.mark.parametrize("fusion", ["geometric", "legacy"])
def test_score_fusion(tiny_clip_config, fusion):
    model = tiny_model(C4_GT, tiny_clip_config)
    pred = model.roi_heads.box_predictor
    pred.fusion = fusion
    pred.no_box_delta = True
    pred.test_score_thresh = 0.0
    pred.test_vocabulary.set(torch.randn(3, 64))
    x = torch.randn(4, 64)
    proposals = [_fake_proposals([2.0, -1.0, 0.5, -3.0])]
    predictions = pred(x)
    probs = torch.softmax(predictions[0], dim=-1)
    fused = pred.predict_probs(predictions, proposals)[0]
    obj = proposals[0].objectness_logits[:, None]
    if fusion == "geometric":
        torch.testing.assert_close(fused, torch.sqrt(torch.sigmoid(obj) * probs))
    instances, _ = pred.inference(predictions, proposals)
    scores = instances[0].scores
    assert torch.isfinite(scores).all()
    boxes = instances[0].pred_boxes.tensor
    kept_regions = set((boxes[:, 0] / 10).round().long().tolist())
    if fusion == "legacy":  # official: raw logit; negative logits give NaN and the region is dropped
        assert kept_regions <= {0, 2}
    else:
        assert kept_regions == {0, 1, 2, 3}


def test_vocabulary_swap(tiny_clip_config):
    model = tiny_model(C4_GT, tiny_clip_config)
    x = [image_input(96, 128, boxes=[[4, 4, 60, 50], [30, 20, 120, 90]])]
    model(x)
    assert model.class_names == ["cat", "dog", "ring"]
    names = model.set_vocabulary(["star", "moon", "heart", "bolt", "ring"])
    assert model.class_names == names and model.roi_heads.box_predictor.num_classes == 5
    model.roi_heads.box_predictor.test_score_thresh = 0.0
    out = model(x)[0]["instances"]
    assert out.pred_classes.max() < 5 and len(set(out.pred_classes.tolist())) > 3
    model.set_vocabulary(torch.randn(1, 64), names=["one"])  # a vocabulary of one class
    out = model(x)[0]["instances"]
    assert set(out.pred_classes.tolist()) == {0} and model.class_names == ["one"]
    with pytest.raises(ValueError, match="dim 32 but the backbone produces 64"):
        model.set_vocabulary(torch.randn(2, 32))


def test_no_vocabulary_is_a_clear_error(tiny_clip_config):
    model = tiny_model(C4_GT, tiny_clip_config, vocabulary=None, extra=["MODEL.CLIP.VOCABULARY", ""])
    with pytest.raises(NoVocabularyError, match="set_vocabulary"):
        model([image_input(64, 64, boxes=[[0, 0, 30, 30]])])


def test_num_classes_mismatch(tiny_clip_config, tmp_path):
    path = tmp_path / "emb.pth"
    torch.save(torch.randn(7, 64), path)
    with pytest.raises(ValueError,
                       match="7 classes but MODEL.ROI_HEADS.NUM_CLASSES=3: set MODEL.ROI_HEADS.NUM_CLASSES 7"):
        tiny_model(C4_GT, tiny_clip_config, vocabulary=None,
                   extra=["MODEL.CLIP.VOCABULARY", "", "MODEL.CLIP.TEXT_EMB_PATH", str(path),
                          "MODEL.ROI_HEADS.NUM_CLASSES", 3])
    with pytest.raises(ValueError,
                       match="MODEL.CLIP.OPENSET_TEST_NUM_CLASSES=5: set MODEL.CLIP.OPENSET_TEST_NUM_CLASSES 7"):
        tiny_model(C4_GT, tiny_clip_config, extra=["MODEL.CLIP.OPENSET_TEST_TEXT_EMB_PATH", str(path),
                                                    "MODEL.CLIP.OPENSET_TEST_NUM_CLASSES", 5])
    with pytest.raises(ValueError, match="TEXT_EMB_DIM"):
        tiny_model(C4_GT, tiny_clip_config, extra=["MODEL.CLIP.TEXT_EMB_DIM", 1024])


def test_openset_test_vocabulary(tiny_clip_config, tmp_path):
    path = tmp_path / "test_emb.pth"
    torch.save(torch.randn(5, 64), path)
    model = tiny_model(C4_GT, tiny_clip_config, extra=["MODEL.CLIP.OPENSET_TEST_TEXT_EMB_PATH", str(path),
                                                        "MODEL.CLIP.OPENSET_TEST_NUM_CLASSES", 5])
    x = [image_input(96, 128, boxes=[[4, 4, 60, 50], [30, 20, 120, 90]])]
    model.roi_heads.box_predictor.test_score_thresh = 0.0
    out = model(x)[0]["instances"]
    assert model.roi_heads.box_predictor.num_classes == 5 and out.pred_classes.max() >= 3
    model.train()
    from detectron2.utils.events import EventStorage

    with EventStorage(0):
        losses = model(x)  # training uses the 3-class training vocabulary
    assert model.roi_heads.box_predictor.num_classes == 3
    assert set(losses) == {"loss_cls", "loss_box_reg"} and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    assert model.roi_heads.box_predictor.num_classes == 5


def test_gt_mode_without_instances(tiny_clip_config):
    model = tiny_model(C4_GT, tiny_clip_config)
    with pytest.raises(ValueError, match="'GT' but an input has no 'instances'"):
        model([image_input(64, 64)])


def test_bad_images(tiny_clip_config):
    model = tiny_model(C4_RPN, tiny_clip_config)
    out = model([image_input(12, 9)])  # smaller than the stride
    assert out[0]["instances"].image_size == (12, 9)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        model([{"image": torch.zeros(1, 32, 32, dtype=torch.uint8)}])
    with pytest.raises(ValueError, match="image is empty"):
        model([{"image": torch.zeros(3, 0, 32, dtype=torch.uint8)}])
    out = model([image_input(1400, 1900)])  # huge: runs (DefaultPredictor would resize it first)
    assert out[0]["instances"].image_size == (1400, 1900)


def test_self_contained_checkpoint_round_trip(tiny_clip_config, tmp_path):
    model = tiny_model(C4_RPN, tiny_clip_config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    DetectionCheckpointer(model, str(tmp_path)).save("model_final")
    fresh = tiny_model(C4_RPN, tiny_clip_config)
    DetectionCheckpointer(fresh).load(str(tmp_path / "model_final.pth"))
    sd, ref = fresh.state_dict(), model.state_dict()
    assert any(k.startswith("offline_backbone.") for k in ref) and any(k.startswith("lang_encoder.") for k in ref)
    for k in ref:
        torch.testing.assert_close(sd[k], ref[k], rtol=0, atol=0)


def _rpn_file(model, path):
    sd = {}
    for k, v in model.state_dict().items():
        for pre, new in (("offline_backbone.", "backbone."), ("offline_proposal_generator.", "proposal_generator.")):
            if k.startswith(pre):
                sd[new + k[len(pre):]] = (torch.randn_like(v) if v.is_floating_point() else v.clone())
    torch.save({"model": sd}, path)
    return sd


def test_bb_rpn_weights_are_loaded_and_win_everywhere(tiny_clip_config, tmp_path):
    base = tiny_model(C4_RPN, tiny_clip_config)
    rpn_sd = _rpn_file(base, tmp_path / "rpn.pth")
    DetectionCheckpointer(base, str(tmp_path)).save("full")  # a checkpoint whose RPN branch differs
    cfg = tiny_cfg(C4_RPN, tiny_clip_config,
                   extra=["MODEL.CLIP.BB_RPN_WEIGHTS", str(tmp_path / "rpn.pth"),
                          "MODEL.WEIGHTS", str(tmp_path / "full.pth")])
    bn_before = base.backbone.layer1[0].bn1.running_mean.clone()
    predictor = DefaultPredictor(cfg)  # loads MODEL.WEIGHTS with detectron2's checkpointer
    model = predictor.model
    got = model.state_dict()
    for k, v in rpn_sd.items():
        torch.testing.assert_close(got["offline_" + k], v, rtol=0, atol=0)
    # the CLIP backbone's FrozenBN statistics survive (the official code resets them)
    assert isinstance(model.backbone.layer1[0].bn1, FrozenBatchNorm2d)
    torch.testing.assert_close(model.backbone.layer1[0].bn1.running_mean, bn_before)


def test_frozen_bn_stats_survive_partial_files(tiny_clip_config, tmp_path):
    model = tiny_model(C4_RPN, tiny_clip_config)
    with torch.no_grad():
        model.backbone.layer2[0].bn2.running_var.fill_(3.0)
    rpn_only = {k: v for k, v in model.state_dict().items() if k.startswith("offline_")}
    model.load_state_dict(rpn_only, strict=False)
    assert (model.backbone.layer2[0].bn2.running_var == 3.0).all()


def test_default_predictor_with_any_vocabulary(tiny_clip_config):
    cfg = tiny_cfg(C4_RPN, tiny_clip_config, extra=["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
                                                     "INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 200])
    predictor = DefaultPredictor(cfg)
    predictor.model.set_vocabulary(["red star", "blue ring"])
    rng = np.random.default_rng(0)
    for image in (rng.integers(0, 255, (90, 150, 3), dtype=np.uint8),
                  np.repeat(rng.integers(0, 255, (70, 70, 1), dtype=np.uint8), 3, axis=2)):
        inst = predictor(image)["instances"]
        assert len(inst) > 0
        assert set(inst.pred_classes.tolist()) <= {0, 1}
        b = inst.pred_boxes.tensor
        h, w = image.shape[:2]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()


def test_vocabulary_names_are_reembedded_after_loading_weights(tiny_clip_config, tmp_path):
    model = tiny_model(C4_GT, tiny_clip_config)
    x = [image_input(64, 64, boxes=[[0, 0, 30, 30]])]
    model(x)
    before = model.roi_heads.box_predictor.train_vocabulary.embeddings.clone()
    sd = {k: (v + torch.randn_like(v) if k == "lang_encoder.text_projection" else v)
          for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    model(x)
    after = model.roi_heads.box_predictor.train_vocabulary.embeddings
    assert not torch.allclose(before, after)  # the new language encoder embedded the names again


@pytest.mark.parametrize("config", [C4_GT, "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_FPN_zsinf_GT.yaml"])
def test_encode_boxes_is_what_the_detector_scores(config, tiny_clip_config):
    """``encode_boxes`` (C4 and FPN) gives the embeddings whose cosines with the vocabulary
    are the detector's logits on the same boxes (GT mode, boxes used as given)."""
    model = tiny_model(config, tiny_clip_config, extra=["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])
    boxes = [[4.0, 6.0, 60.0, 50.0], [30.0, 20.0, 90.0, 80.0]]
    x = image_input(96, 128, boxes=boxes)
    model.set_vocabulary(["cat", "dog", "ring"])
    emb = model.encode_boxes([x], [torch.tensor(boxes)])[0]
    assert emb.shape == (2, 64)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    pred = model.roi_heads.box_predictor
    probs = pred.classify(emb).softmax(-1)
    with torch.no_grad():
        images = model.preprocess_image([x])
        features = model.backbone(images.tensor)
        regions = model.get_regions([x])
        feats = model.roi_heads.encode_boxes(features, [r.proposal_boxes for r in regions])
        logits, _ = pred(feats) if config == C4_GT else pred(model.roi_heads.box_head(
            model.roi_heads.box_pooler([features[f] for f in model.roi_heads.box_in_features],
                                       [r.proposal_boxes for r in regions])))
    torch.testing.assert_close(probs, logits.softmax(-1), atol=1e-5, rtol=1e-4)
    # a Boxes object works as well, and an image-count mismatch is a clear error
    torch.testing.assert_close(model.encode_boxes([x], [Boxes(torch.tensor(boxes))])[0], emb)
    with pytest.raises(ValueError, match="one per image"):
        model.encode_boxes([x, x], [torch.tensor(boxes)])


def test_detector_is_built_from_modules_and_tensors_alone(tiny_clip_config):
    """__init__ reads no file and takes no cfg: a detector assembled from built modules and a
    tensor vocabulary classifies ground-truth boxes exactly as the one build_model makes."""
    from detectron2.modeling import build_backbone
    from detectron2.modeling.roi_heads import build_roi_heads

    from regionclip_d2 import CLIPFastRCNN
    from regionclip_d2.modeling.text import build_language_encoder

    cfg = tiny_cfg(C4_GT, tiny_clip_config)
    torch.manual_seed(0)
    reference = build_model(cfg).eval()
    backbone = build_backbone(cfg)
    roi_heads = build_roi_heads(cfg, backbone.output_shape())
    model = CLIPFastRCNN(backbone=backbone, roi_heads=roi_heads,
                         lang_encoder=build_language_encoder("", tiny_clip_config), region_type="GT",
                         pixel_mean=cfg.MODEL.PIXEL_MEAN, pixel_std=cfg.MODEL.PIXEL_STD,
                         train_vocabulary=torch.randn(3, 64))
    model.load_state_dict(reference.state_dict())
    model.eval()
    emb = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    for m in (model, reference):
        m.set_vocabulary(emb)
    inp = image_input(96, 128, boxes=[[10, 10, 60, 70], [50, 20, 120, 90]])
    with torch.no_grad():
        a, b = model([inp])[0]["instances"], reference([inp])[0]["instances"]
    torch.testing.assert_close(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)
