"""The opt-in score ensemble with a frozen CLIP region classifier (MODEL.CLIP.ENSEMBLE_WEIGHTS):
the combination by hand, base/novel classes from the two vocabularies, and a detector whose
scores are exactly its own (shares 0) or exactly the frozen model's zero-shot probabilities
(shares 1) at the extremes, with the frozen model loaded from a CLIP file and kept frozen."""
import pytest
import torch
from helpers import image_input, tiny_model

from regionclip_d2.modeling.ensemble import RegionEnsemble, ensemble_probs

C4_GT = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf_GT.yaml"
FPN_GT = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_FPN_zsinf_GT.yaml"
BOXES = [[4, 4, 60, 50], [30, 20, 120, 90], [0, 0, 128, 96], [50, 10, 70, 40]]


def test_ensemble_probs_by_hand():
    det = torch.tensor([[0.6, 0.1, 0.1, 0.2], [0.05, 0.05, 0.7, 0.2]])
    zs = torch.tensor([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    lam = torch.tensor([0.35, 0.35, 0.65])
    got = ensemble_probs(det, zs, lam)
    assert got.shape == (2, 4)
    assert got[0, 0] == pytest.approx(0.6 ** 0.65 * 0.2 ** 0.35, rel=1e-6)
    assert got[1, 2] == pytest.approx(0.7 ** 0.35 * 0.8 ** 0.65, rel=1e-6)
    assert torch.equal(got[:, 3], det[:, 3])  # background: the detector's
    with pytest.raises(ValueError, match="must score the test vocabulary"):
        ensemble_probs(det, zs[:, :2], lam[:2])


@pytest.fixture
def clip_file(tiny_clip, tmp_path):
    path = tmp_path / "clip.pt"
    torch.save(tiny_clip.state_dict(), path)
    return str(path)


def _ensemble_model(cfg_file, tiny_clip_config, clip_file, alpha, beta, vocab="cat,dog,ring"):
    return tiny_model(cfg_file, tiny_clip_config, vocabulary=vocab,
                      extra=["MODEL.CLIP.CLIP_WEIGHTS", clip_file, "MODEL.CLIP.ENSEMBLE_WEIGHTS", clip_file,
                             "MODEL.CLIP.ENSEMBLE_ALPHA", alpha, "MODEL.CLIP.ENSEMBLE_BETA", beta])


def _scores_by_box_and_class(out):
    inst = out[0]["instances"]
    return {(tuple(round(v, 3) for v in b), int(c)): float(s)
            for b, c, s in zip(inst.pred_boxes.tensor.tolist(), inst.pred_classes.tolist(), inst.scores.tolist())}


@pytest.mark.parametrize("cfg_file", [C4_GT, FPN_GT])
def test_shares_zero_keep_the_detectors_scores_and_one_gives_the_frozen_models(tiny_clip_config, tiny_clip,
                                                                               clip_file, cfg_file):
    x = [image_input(96, 128, boxes=BOXES)]
    plain = tiny_model(cfg_file, tiny_clip_config, extra=["MODEL.CLIP.CLIP_WEIGHTS", clip_file])
    zero = _ensemble_model(cfg_file, tiny_clip_config, clip_file, 0.0, 0.0)
    assert not any(p.requires_grad for p in zero.ensemble.parameters())
    # the frozen model holds the CLIP file's image tower, whatever the detector's own weights become
    torch.testing.assert_close(zero.ensemble.encoder.attnpool.c_proj.weight, tiny_clip.visual.attnpool.c_proj.weight)
    a, b = _scores_by_box_and_class(plain(x)), _scores_by_box_and_class(zero(x))
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)
    one = _ensemble_model(cfg_file, tiny_clip_config, clip_file, 1.0, 1.0)
    got = _scores_by_box_and_class(one(x))
    # by hand: the C4 path of the CLIP image tower on the given boxes, softmax over the classes / 0.01
    c4 = tiny_model(C4_GT, tiny_clip_config, extra=["MODEL.CLIP.CLIP_WEIGHTS", clip_file])
    emb = c4.encode_boxes(x, [torch.tensor(BOXES, dtype=torch.float32)])[0]
    text = torch.nn.functional.normalize(one.roi_heads.box_predictor.cls_score.embeddings(), dim=-1)
    want = torch.softmax(emb @ text.t() / 0.01, dim=1)
    checked = 0
    for (box, cls), score in got.items():
        i = [tuple(round(float(v), 3) for v in b) for b in BOXES].index(box)
        assert score == pytest.approx(float(want[i, cls]), abs=1e-5)
        checked += 1
    assert checked >= len(BOXES)


def test_novel_classes_by_name_and_by_embedding(tiny_clip_config, clip_file):
    model = _ensemble_model(C4_GT, tiny_clip_config, clip_file, 0.35, 0.65)
    model.prepare_vocabulary()
    assert model.novel_classes().tolist() == [False, False, False]  # the training vocabulary is in use
    model.set_vocabulary(["dog", "moon", "cat", "heart"])
    model.prepare_vocabulary()
    assert model.novel_classes().tolist() == [False, True, False, True]
    train = model._vocabulary(True).embeddings.clone()
    model.set_vocabulary(torch.cat([train[[1]], torch.randn(1, train.shape[1])]))  # no names: by embedding
    assert model.novel_classes().tolist() == [False, True]
    shares = model.ensemble.shares(torch.tensor([False, True]))
    assert shares.tolist() == pytest.approx([0.35, 0.65])


def test_ensemble_errors(tiny_clip_config, clip_file, tiny_clip):
    with pytest.raises(ValueError, match=r"ENSEMBLE_BETA=1.5: the frozen model's share must lie in \[0, 1\]"):
        RegionEnsemble(tiny_clip.visual, 0.3, 1.5)
    with pytest.raises(ValueError, match="region embeddings but the text embeddings have dim 32"):
        tiny_model(C4_GT, tiny_clip_config, extra=["MODEL.CLIP.ENSEMBLE_WEIGHTS", clip_file,
                                                   "MODEL.CLIP.TEXT_EMB_DIM", 32])


def test_ensemble_model_stays_frozen_in_training_mode(tiny_clip_config, clip_file):
    model = _ensemble_model(C4_GT, tiny_clip_config, clip_file, 0.35, 0.65)
    model.train()
    assert not model.ensemble.encoder.training


def test_export_refuses_an_ensembled_detector(tiny_clip_config, clip_file):
    from regionclip_d2.export.recognition import RecognitionGraph

    model = _ensemble_model(C4_GT, tiny_clip_config, clip_file, 0.35, 0.65)
    model.prepare_vocabulary()
    with pytest.raises(ValueError, match="export without MODEL.CLIP.ENSEMBLE_WEIGHTS"):
        RecognitionGraph(model, model._vocabulary(True).embeddings)
