"""The seams of the modeling core: the Vocabulary object, the two-branch base (RPN losses by
return, frozen modules), the C4 head's region encoder, copies and pickles of a detector."""
import copy
import pickle

import pytest
import torch
from helpers import image_input, tiny_model

from detectron2.utils.events import EventStorage

from regionclip_d2.modeling.roi_heads import NoVocabularyError, TextEmbeddingClassifier, Vocabulary

C4_GT = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml"
C4_RPN = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml"


def test_vocabulary_states():
    v = Vocabulary(4, "test vocabulary")
    assert len(v) == 0 and v.source == "" and not v.stale
    v.request(["a", "b", "c"])
    assert len(v) == 3 and v.stale and v.from_names and v.embeddings.shape == (0, 4)
    calls = []

    def embed(names):
        calls.append(list(names))
        return torch.eye(4)[: len(names)]

    v.refresh(embed)
    v.refresh(embed)  # not stale any more: nothing to do
    assert calls == [["a", "b", "c"]] and not v.stale and torch.equal(v.embeddings, torch.eye(4)[:3])
    v.text_encoder_changed()  # names are embedded again with new text-encoder weights
    assert v.stale
    v.refresh(embed)
    assert len(calls) == 2
    v.set(torch.ones(2, 4), ["x", "y"], source="tensor")
    v.text_encoder_changed()  # a tensor vocabulary does not depend on the text encoder
    assert not v.stale and v.names == ["x", "y"] and len(v) == 2
    with pytest.raises(ValueError, match="dim 3 but the backbone produces 4"):
        v.set(torch.ones(2, 3))
    with pytest.raises(ValueError, match="2 names given for 1 embeddings"):
        v.set(torch.ones(1, 4), ["x", "y"])
    with pytest.raises(ValueError, match="empty"):
        v.request([])


def test_classifier_uses_the_active_vocabulary_and_refuses_a_stale_one():
    clf = TextEmbeddingClassifier(4, temperature=0.5)
    with pytest.raises(NoVocabularyError, match="no vocabulary"):
        clf(torch.randn(2, 4))
    clf.train_vocabulary.set(torch.eye(4)[:2])
    x = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(clf.eval()(x), torch.tensor([[1.0, 0.0, 0.0]]) / 0.5)  # no test vocabulary: train
    clf.test_vocabulary.set(torch.eye(4)[1:4])
    torch.testing.assert_close(clf(x), torch.tensor([[0.0, 0.0, 0.0, 0.0]]))
    assert clf.num_classes() == 3 and clf.train().num_classes() == 2
    clf.eval().test_vocabulary.request(["p", "q"])
    with pytest.raises(NoVocabularyError, match="not been embedded yet"):
        clf(x)


def test_rpn_branch_losses_are_returned_only_when_it_is_trained(tiny_clip_config):
    with EventStorage():  # training-mode RPN and RoI heads log to the event storage
        _check_rpn_branch_losses(tiny_clip_config)


def _check_rpn_branch_losses(tiny_clip_config):
    frozen = tiny_model(C4_RPN, tiny_clip_config).train()
    assert not frozen.offline_backbone.training and not frozen.offline_proposal_generator.training
    assert not any(p.requires_grad for p in frozen.offline_backbone.parameters())
    x = [image_input(96, 128, boxes=[[10, 10, 60, 70]])]
    gt = [x[0]["instances"]]
    regions, losses = frozen.propose(x, gt)
    assert losses == {} and len(regions[0]) > 0 and regions[0].has("objectness_logits")
    assert "loss_rpn_cls" not in frozen(x)
    trained = tiny_model(C4_RPN, tiny_clip_config, extra=["MODEL.CLIP.TRAIN_OFFLINE_RPN", True]).train()
    assert trained.offline_backbone.training
    _, losses = trained.propose(x, gt)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"} and losses["loss_rpn_cls"].requires_grad
    assert {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"} <= set(trained(x))
    assert trained.eval().propose(x, gt)[1] == {}  # evaluation: no losses


def test_c4_head_keeps_detectron2_signature_and_its_encoder_is_the_backbones(tiny_clip_config):
    model = tiny_model(C4_GT, tiny_clip_config)
    # the model's method, which runs the backbone's res5 + attention pool (or their folded copies)
    assert model.roi_heads.region_encoder.__self__ is model
    assert not any(k.startswith("roi_heads.") and "layer4" in k for k in model.state_dict())  # res5 stays backbone.*
    x = image_input(96, 128, boxes=[[10, 10, 60, 70]])
    model.prepare_vocabulary()  # names from the config: embedded before the head is called directly
    with torch.no_grad():
        images = model.preprocess_image([x])
        features = model.backbone(images.tensor)
        out, _ = model.roi_heads(images, features, model.get_regions([x]))  # detectron2 ROIHeads.forward
    assert len(out[0]) > 0


def test_deep_copy_and_pickle_of_a_detector_are_independent_and_load_any_format(tiny_clip_config):
    model = tiny_model(C4_GT, tiny_clip_config)
    x = [image_input(96, 128)]
    boxes = [torch.tensor([[10.0, 10.0, 60.0, 70.0], [40.0, 20.0, 120.0, 90.0]])]
    want = model.encode_boxes(x, boxes)[0]
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        # the copy's RoI head encodes with the copy's backbone, not the original's
        assert twin.roi_heads.region_encoder.__self__ is twin
        torch.testing.assert_close(twin.encode_boxes(x, boxes)[0], want)
        with torch.no_grad():
            for p in twin.backbone.layer4.parameters():
                p.add_(torch.randn_like(p))
        assert not torch.allclose(twin.encode_boxes(x, boxes)[0], want, atol=1e-3)
        torch.testing.assert_close(model.encode_boxes(x, boxes)[0], want)  # the original is untouched
        # the copy's load hook works on the copy: an official vocabulary key is dropped, the rest loaded
        sd = dict(model.state_dict())
        sd["roi_heads.box_predictor.cls_score.weight"] = torch.randn(5, 64)
        twin.load_state_dict(sd)
        torch.testing.assert_close(twin.encode_boxes(x, boxes)[0], want)


def test_loading_weights_without_a_text_encoder_keeps_name_vocabularies(tiny_clip_config):
    model = tiny_model(C4_GT, tiny_clip_config)
    x = [image_input(96, 128, boxes=[[10, 10, 60, 70]])]
    with torch.no_grad():
        model(x)
    vocab = model.roi_heads.box_predictor.train_vocabulary
    assert vocab.from_names and not vocab.stale
    model.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("lang_encoder.")},
                          strict=False)
    assert not vocab.stale  # the text encoder did not change: no re-embedding
    model.load_state_dict(model.state_dict())
    assert vocab.stale  # new text-encoder weights: embedded again by the next call
    model.prepare_vocabulary()
    assert not vocab.stale


def test_pretraining_regions_are_instances_of_every_type(tiny_clip_config):
    from test_pretrain import batch, pretrain_cfg

    from detectron2.modeling import build_model

    for region_type in ("GRID", "RANDOM", "RPN"):
        torch.manual_seed(0)
        model = build_model(pretrain_cfg(tiny_clip_config, region_type)).eval()
        inputs = batch()
        regions = model.get_regions(inputs)
        assert len(regions) == len(inputs)
        for r, x in zip(regions, inputs):
            assert r.image_size == tuple(x["image"].shape[-2:]) and len(r) > 0
            b = r.proposal_boxes.tensor
            assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert all(not m.training for m in model.frozen_modules())
        model.train()
        assert all(not m.training for m in model.frozen_modules()) and model.backbone.training
