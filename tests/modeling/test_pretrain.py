"""Region-text pretraining: the losses by hand, pinned values, learning, the gathered
image-text loss over 2 processes, and the hand-off to CLIPFastRCNN."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import image_input, tiny_model

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from regionclip_d2 import get_regionclip_cfg
from regionclip_d2.modeling.losses import (
    image_text_contrastive_loss,
    pseudo_labels,
    region_concept_contrastive_loss,
    region_concept_distillation_loss,
)
from regionclip_d2.modeling.meta_arch.pretrain import grid_boxes, random_boxes

PRETRAIN = "configs/pretrain/RegionCLIP_RN50.yaml"


def pretrain_cfg(tiny_clip_config, region_type="GRID", extra=(), base=PRETRAIN):
    cfg = get_regionclip_cfg(base, ["MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_clip_config,
                                        "MODEL.CLIP.TEXT_EMB_DIM", 64, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 4,
                                        "MODEL.CLIP.TEACHER_POOLER_RESOLUTION", 4, "MODEL.DEVICE", "cpu",
                                        "MODEL.CLIP.CROP_REGION_TYPE", region_type, "MODEL.CLIP.GATHER_GPUS", False]
                             + list(extra))
    return cfg


def batch():
    return [dict(image_input(96, 128), caption="a red star next to a blue ring"),
            dict(image_input(64, 96, seed=1), caption="two green moons"),
            dict(image_input(80, 80, seed=2), caption="a yellow heart")]


def test_contrastive_loss_paper_form_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0, 3.0], [0.0, 1.0, 2.0, -2.0], [1.0, 1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2, 0])  # matched concepts {0, 2}: concept 1 and 3 are not negatives
    expected = []
    for i, m in enumerate(labels.tolist()):
        pos = math.exp(logits[i, m])
        neg = sum(math.exp(logits[i, k]) for k in (0, 2) if k != m)
        expected.append(-math.log(pos / (pos + neg)))
    got = region_concept_contrastive_loss(logits, labels, form="paper").item()
    assert got == pytest.approx(sum(expected) / 3, rel=1e-6)


def test_contrastive_loss_official_form_by_hand():
    """The official form: a softmax over the kept regions' pseudo concepts, each concept
    once per region that matched it; the positives of region i are all j with t_j == t_i."""
    logits = torch.tensor([[2.0, 0.5, -1.0, 3.0], [0.0, 1.0, 2.0, -2.0], [1.0, 1.0, 0.0, 0.0],
                           [0.3, -0.7, 1.5, 0.2]])
    labels = torch.tensor([0, 2, 0, 3])
    expected = []
    for i in range(4):
        terms = [math.exp(logits[i, labels[j]]) for j in range(4)]
        pos = sum(t for t, j in zip(terms, range(4)) if labels[j] == labels[i])
        expected.append(-math.log(pos / sum(terms)))
    got = region_concept_contrastive_loss(logits, labels).item()  # the default form
    assert got == pytest.approx(sum(expected) / 4, rel=1e-6)
    # a frequent concept weighs more than in the paper's form: the two forms differ here
    assert got != pytest.approx(region_concept_contrastive_loss(logits, labels, form="paper").item(), rel=1e-3)
    # with all pseudo labels distinct the two forms agree
    distinct = torch.tensor([0, 2, 1, 3])
    assert region_concept_contrastive_loss(logits, distinct).item() == pytest.approx(
        region_concept_contrastive_loss(logits, distinct, form="paper").item(), rel=1e-6)
    with pytest.raises(ValueError, match="official"):
        region_concept_contrastive_loss(logits, labels, form="per-concept")


def test_contrastive_loss_official_form_gradient_is_finite_with_large_logits():
    logits = (torch.randn(6, 5, generator=torch.Generator().manual_seed(0)) * 100).requires_grad_(True)
    loss = region_concept_contrastive_loss(logits, torch.tensor([0, 1, 1, 4, 0, 2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_distillation_loss_by_hand():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    q_t = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    q = s.softmax(-1)
    expected = (q_t * (q_t.log() - q.log())).sum(-1).mean()
    assert region_concept_distillation_loss(s, q_t).item() == pytest.approx(expected.item(), rel=1e-6)
    assert region_concept_distillation_loss(q_t.log(), q_t).abs().item() < 1e-6  # equal distributions


def test_image_text_loss_by_hand():
    img, txt = torch.randn(3, 8), torch.randn(3, 8)
    logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t() / 0.01
    expected = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.t(), torch.arange(3))) / 2
    assert image_text_contrastive_loss(img, txt, 0.01).item() == pytest.approx(expected.item(), rel=1e-5)


def test_pseudo_labels_threshold():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.1, 0.0, 0.05]])
    labels, soft, keep = pseudo_labels(logits, threshold=0.5)
    assert labels.tolist() == [0, 0] and keep.tolist() == [True, False]
    torch.testing.assert_close(soft.sum(-1), torch.ones(2))
    _, _, keep = pseudo_labels(logits, threshold=0.999)  # none passes: all are kept
    assert keep.tolist() == [True, True]


def test_region_generators():
    g = grid_boxes(90, 120, 3, 4)
    assert g.shape == (12, 4) and g[-1].tolist() == [90.0, 60.0, 120.0, 90.0]
    r = random_boxes(50, 70, 30, generator=torch.Generator().manual_seed(0))
    assert r.shape == (30, 4) and (r[:, 2] <= 70).all() and (r[:, 3] <= 50).all() and (r[:, :2] >= 0).all()
    assert ((r[:, 2] - r[:, 0]) >= 7 - 1e-4).all()


@pytest.mark.parametrize("region_type", ["GRID", "RANDOM", "RPN"])
def test_pretrain_forward_all_region_types(tiny_clip_config, region_type):
    torch.manual_seed(0)
    model = build_model(pretrain_cfg(tiny_clip_config, region_type))
    model.set_concept_pool(torch.randn(7, 64))  # fewer concepts than regions
    model.train()
    with EventStorage(0):
        losses = model(batch())
    assert set(losses) == {"loss_region_contrastive", "loss_region_distillation", "loss_image_text"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    out = model(batch())
    assert len(out) == 3 and out[0]["embeddings"].shape[1] == 64
    # the student starts equal to the teacher; the teacher and text encoder are frozen
    assert not any(p.requires_grad for p in model.teacher_backbone.parameters())
    assert not any(p.requires_grad for p in model.lang_encoder.parameters())
    torch.testing.assert_close(model.backbone.layer3[0].conv1.weight, model.teacher_backbone.layer3[0].conv1.weight)


def test_image_text_box_per_image_or_padded_batch(tiny_clip_config):
    """Default: each image's whole-image box is the image; LEGACY_PADDED_IMAGE_BOX (the
    official behaviour): one box over the whole padded batch tensor for every image."""
    from detectron2.structures import ImageList

    images = ImageList(torch.zeros(2, 3, 96, 128), [(96, 128), (64, 96)])
    torch.manual_seed(0)
    model = build_model(pretrain_cfg(tiny_clip_config))
    assert model.image_box_sizes(images) == [(96, 128), (64, 96)]
    torch.manual_seed(0)
    legacy = build_model(pretrain_cfg(tiny_clip_config, extra=["MODEL.CLIP.LEGACY_PADDED_IMAGE_BOX", True]))
    assert legacy.image_box_sizes(images) == [(96, 128), (96, 128)]
    # the loss sees it: the smaller images' embeddings (and so the loss) change
    model.set_concept_pool(torch.randn(7, 64, generator=torch.Generator().manual_seed(0)))
    legacy.set_concept_pool(model.concept_emb)
    model.train()
    legacy.train()
    with EventStorage(0):
        torch.manual_seed(1)
        a = model(batch())["loss_image_text"]
        torch.manual_seed(1)
        b = legacy(batch())["loss_image_text"]
    assert torch.isfinite(a) and torch.isfinite(b) and abs(a.item() - b.item()) > 1e-4


def _train_steps(tiny_clip_config, steps, seed=0):
    torch.manual_seed(seed)
    model = build_model(pretrain_cfg(tiny_clip_config))
    g = torch.Generator().manual_seed(1)
    model.set_concept_pool(torch.randn(12, 64, generator=g))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
    history = []
    with EventStorage(0):
        for _ in range(steps):
            losses = model(batch())
            total = sum(losses.values())
            opt.zero_grad()
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)  # as the official schedule (SOLVER.CLIP_GRADIENTS)
            opt.step()
            history.append({k: float(v) for k, v in losses.items()})
    return history


def test_pinned_losses(tiny_clip_config):
    """Make sure the pretraining losses of a fixed seed do not change."""
    h = _train_steps(tiny_clip_config, 2)
    assert h[0]["loss_image_text"] == pytest.approx(3.7514, abs=1e-3)
    assert h[0]["loss_region_distillation"] == pytest.approx(0.0, abs=1e-5)  # student == teacher at step 0
    assert h[1]["loss_region_distillation"] > 0


def test_losses_decrease(tiny_clip_config):
    h = _train_steps(tiny_clip_config, 16)
    first = h[0]["loss_image_text"]
    last = sum(x["loss_image_text"] for x in h[-3:]) / 3
    assert last < 0.75 * first, [round(x["loss_image_text"], 3) for x in h]
    assert all(all(math.isfinite(v) for v in x.values()) for x in h)


def test_handoff_to_clip_fast_rcnn(tiny_clip_config, tmp_path):
    torch.manual_seed(0)
    model = build_model(pretrain_cfg(tiny_clip_config))
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p))  # the student moved away from the teacher
    DetectionCheckpointer(model, str(tmp_path)).save("pretrained")
    det = tiny_model("configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_ovd.yaml", tiny_clip_config,
                     extra=["MODEL.WEIGHTS", str(tmp_path / "pretrained.pth")])
    DetectionCheckpointer(det).load(str(tmp_path / "pretrained.pth"))
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(det.backbone.state_dict()[k], v, rtol=0, atol=0)
    for k, v in model.lang_encoder.state_dict().items():
        torch.testing.assert_close(det.lang_encoder.state_dict()[k], v, rtol=0, atol=0)
    assert det.lang_encoder_loaded


def _gathered_worker(rank, world, init_file, img, txt, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    b = img.shape[0] // world
    mine_img = img[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    loss = image_text_contrastive_loss(mine_img, txt[rank * b:(rank + 1) * b], 0.05, gather=True)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": mine_img.grad}, f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_gathered_image_text_loss_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    mp.spawn(_gathered_worker, args=(2, str(tmp_path / "init"), img, txt, str(tmp_path / "out")), nprocs=2)
    parts = [torch.load(f"{tmp_path / 'out'}.{r}", weights_only=True) for r in range(2)]
    full_img = img.clone().requires_grad_(True)
    single = image_text_contrastive_loss(full_img, txt, 0.05)
    single.backward()
    # DDP averages over processes: the mean of the per-process losses is the global loss
    assert (parts[0]["loss"] + parts[1]["loss"]).item() / 2 == pytest.approx(single.item(), rel=1e-5)
    # each process's gradient (times the world size, as DDP averages) is the global gradient's rows
    grads = torch.cat([parts[0]["grad"], parts[1]["grad"]]) / 2
    torch.testing.assert_close(grads, full_img.grad, rtol=1e-4, atol=1e-6)
