"""CLIPSelf: the loss by hand (crops and RoIAligns built by hand), learning, the teacher
frozen and equal to the student at the start, given boxes instead of the grid, bad inputs."""
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT
from helpers import image_input

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from regionclip_d2 import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD, get_regionclip_cfg
from regionclip_d2.modeling.backbone.clip_vit import ImageTooSmallError
from regionclip_d2.modeling.clip_model import build_clip_from_config
from regionclip_d2.modeling.meta_arch.clipself import RegionOutsideImageError

CONFIG = "configs/clipself/CLIPSelf_ViT-B-16.yaml"


def clipself_cfg(tiny_vit_config, extra=(), base=CONFIG):
    return get_regionclip_cfg(base, ["MODEL.CLIP.OPENCLIP_MODEL_CONFIG", tiny_vit_config, "MODEL.DEVICE", "cpu"]
                              + list(extra))


def build(tiny_vit_config, extra=()):
    torch.manual_seed(0)
    return build_model(clipself_cfg(tiny_vit_config, extra))


def _normalise(image_uint8):
    x = image_uint8.float() / 255.0
    return (x - torch.tensor(CLIP_PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_PIXEL_STD).view(3, 1, 1)


def test_loss_by_hand(tiny_vit_config):
    """64x64 images, 8 px patches, MAX_GRID 2: cells of 32 or 64 px. The teacher sees each cell
    resized to its native 32 px (a 32 px cell as it is, a 64 px cell averaged over 2x2 pixels);
    the student's embedding is the mean of the dense map's 4x4 (or 8x8) cells under the region.
    The teacher is checked with open_clip's own VisionTransformer holding the same weights."""
    model = build(tiny_vit_config, ["MODEL.CLIPSELF.MAX_GRID", 2]).train()
    inputs = [image_input(64, 64, seed=s) for s in (3, 4, 5)]
    seed = 11
    torch.manual_seed(seed)
    grids = [tuple(int(v) for v in torch.randint(1, 3, (2,))) for _ in inputs]  # (rows, cols) per image
    assert len(set(grids)) > 1  # the draw differs between images
    torch.manual_seed(seed)
    loss = model(inputs)["loss_clipself"]

    visual = build_clip_from_config(TINY_VIT).visual.eval()
    visual.load_state_dict(model.teacher_backbone.state_dict())
    terms = []
    with torch.no_grad():
        for x, (m, n) in zip(inputs, grids):
            img = _normalise(x["image"])
            dense = model.backbone(img[None])["dense"][0]  # [D, 8, 8]
            ch, cw = 64 // m, 64 // n
            for i in range(m):
                for j in range(n):
                    crop = img[:, i * ch:(i + 1) * ch, j * cw:(j + 1) * cw]
                    crop = F.avg_pool2d(crop[None], kernel_size=(ch // 32, cw // 32))  # to 32x32
                    t = visual(crop)[0]
                    s = dense[:, i * ch // 8:(i + 1) * ch // 8, j * cw // 8:(j + 1) * cw // 8].mean(dim=(1, 2))
                    terms.append(1 - F.cosine_similarity(s, t, dim=0))
    assert len(terms) == sum(m * n for m, n in grids)
    torch.testing.assert_close(loss.detach(), torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)


def test_student_starts_as_teacher_and_teacher_gets_no_gradient(tiny_vit_config):
    model = build(tiny_vit_config, ["MODEL.CLIPSELF.MAX_GRID", 1]).train()
    s_sd, t_sd = model.backbone.state_dict(), model.teacher_backbone.state_dict()
    assert s_sd.keys() == t_sd.keys() and all(torch.equal(s_sd[k], t_sd[k]) for k in s_sd)
    assert not model.teacher_backbone.training and model.backbone.training
    x = [image_input(32, 32)]  # the native size, a 1x1 grid: the crop is the whole image
    loss = model(x)["loss_clipself"]
    # the student's own image path gives the teacher's embedding exactly: the loss is > 0 only
    # because the student's region embedding comes from the dense (value-path) map
    img = _normalise(x[0]["image"])[None]
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.encode_image(img), model.teacher_embeddings(
            img, [Boxes(torch.tensor([[0.0, 0.0, 32.0, 32.0]]))]), atol=1e-5, rtol=1e-5)
    assert loss.item() > 1e-3
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher_backbone.parameters())
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_loss_decreases(tiny_vit_config):
    model = build(tiny_vit_config, ["MODEL.CLIPSELF.MAX_GRID", 3]).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.1)
    inputs = [image_input(48, 64, seed=s) for s in range(2)]
    losses = []
    for step in range(6):
        torch.manual_seed(step % 2)  # two grid draws, alternating
        loss = model(inputs)["loss_clipself"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.manual_seed(0)
    with torch.no_grad():
        after = model(inputs)["loss_clipself"].item()
    assert after < 0.7 * losses[0], losses + [after]
    t0 = build(tiny_vit_config).teacher_backbone.state_dict()  # the teacher did not move
    assert all(torch.equal(v, t0[k]) for k, v in model.teacher_backbone.state_dict().items())


def test_grid_draw_is_seeded_and_eval_output(tiny_vit_config):
    model = build(tiny_vit_config).eval()
    inputs = [image_input(64, 96, seed=1), image_input(40, 40, seed=2)]
    torch.manual_seed(5)
    a = model(inputs)
    torch.manual_seed(5)
    b = model(inputs)
    for ra, rb, x in zip(a, b, inputs):
        assert torch.equal(ra["regions"].tensor, rb["regions"].tensor)
        n = len(ra["regions"])
        assert 1 <= n <= 36 and ra["embeddings"].shape == ra["teacher_embeddings"].shape == (n, 24)
        torch.testing.assert_close(ra["embeddings"].norm(dim=-1), torch.ones(n))
        boxes = ra["regions"].tensor  # the cells tile the image
        torch.testing.assert_close(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum(),
                                   torch.tensor(float(x["height"] * x["width"])))


def _with_proposals(x, boxes):
    x = dict(x)
    x["proposals"] = Instances(tuple(x["image"].shape[-2:]), proposal_boxes=Boxes(torch.tensor(boxes)))
    return x


def test_given_boxes_instead_of_grid(tiny_vit_config):
    model = build(tiny_vit_config, ["MODEL.CLIPSELF.REGION_TYPE", "PROPOSALS", "MODEL.CLIPSELF.MAX_PROPOSALS", 2])
    boxes = [[0.0, 0.0, 32.0, 32.0], [8.0, 16.0, 40.0, 48.0], [4.5, 3.0, 60.0, 47.0]]
    x = _with_proposals(image_input(48, 64), boxes)
    model.eval()
    torch.manual_seed(0)
    out = model([x])[0]
    assert len(out["regions"]) == 2  # MAX_PROPOSALS: a random subset
    assert {tuple(b) for b in out["regions"].tensor.tolist()} <= {tuple(b) for b in boxes}
    model.train()
    assert torch.isfinite(model([x])["loss_clipself"])
    # the first given box at the native size: the teacher embeds exactly that crop
    img = _normalise(x["image"])[None]
    with torch.no_grad():
        t = model.teacher_embeddings(img, [Boxes(torch.tensor(boxes[:1]))])
        torch.testing.assert_close(t, model.teacher_backbone.encode_image(img[:, :, :32, :32]), atol=1e-5,
                                   rtol=1e-5)
    with pytest.raises(ValueError, match="no 'proposals'.*PROPOSAL_FILES_TRAIN.*REGION_TYPE GRID"):
        model([image_input(48, 64)])


def test_encode_boxes_gives_the_training_embeddings_of_given_boxes(tiny_vit_config):
    """encode_boxes (region classification's reader): the student's pooled dense map and the
    teacher's crop embedding of each given box, as the eval forward computes them for the same
    boxes, L2-normalised; a box outside the image is an error."""
    model = build(tiny_vit_config, ["MODEL.CLIPSELF.REGION_TYPE", "PROPOSALS", "MODEL.CLIPSELF.MAX_PROPOSALS", 0])
    model.eval()
    boxes = [[[0.0, 0.0, 32.0, 32.0], [8.0, 16.0, 40.0, 48.0]], [[4.5, 3.0, 30.0, 20.0]]]
    inputs = [image_input(48, 64, seed=1), image_input(32, 40, seed=2)]
    ref = model([_with_proposals(x, b) for x, b in zip(inputs, boxes)])
    student = model.encode_boxes(inputs, [torch.tensor(b) for b in boxes])
    teacher = model.encode_boxes(inputs, [Boxes(torch.tensor(b)) for b in boxes], teacher=True)
    for r, s, t, b in zip(ref, student, teacher, boxes):
        assert s.shape == t.shape == (len(b), 24)
        torch.testing.assert_close(s, r["embeddings"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t, r["teacher_embeddings"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(student[0], teacher[0], atol=1e-3)  # two different read-outs
    with pytest.raises(RegionOutsideImageError, match="input 1: 1 of 1 region boxes"):
        model.encode_boxes(inputs, [torch.tensor(boxes[0]), torch.tensor([[0.0, 0.0, 50.0, 10.0]])])
    with pytest.raises(ValueError, match="1 box sets for 2 images"):
        model.encode_boxes(inputs, [torch.tensor(boxes[0])])


@pytest.mark.parametrize("box", [[-5.0, 0.0, 20.0, 20.0], [10.0, 10.0, 70.0, 20.0], [10.0, 10.0, 10.0, 20.0]],
                         ids=["left-of-image", "right-of-image", "empty"])
def test_boxes_outside_the_image(tiny_vit_config, box):
    model = build(tiny_vit_config, ["MODEL.CLIPSELF.REGION_TYPE", "PROPOSALS"]).train()
    x = _with_proposals(image_input(48, 64), [[0.0, 0.0, 16.0, 16.0], box])
    with pytest.raises(RegionOutsideImageError, match="input 0: 1 of 2 region boxes are empty or fall outside the "
                                                      "64x48 image.*clip the boxes to the image"):
        model([x])


def test_bad_config_and_small_images(tiny_vit_config, tiny_clip_config):
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"MAX_GRID={bad}: .*at least 1"):
            build(tiny_vit_config, ["MODEL.CLIPSELF.MAX_GRID", bad])
    with pytest.raises(ValueError, match="REGION_TYPE='RPN'"):
        build(tiny_vit_config, ["MODEL.CLIPSELF.REGION_TYPE", "RPN"])
    with pytest.raises(ValueError, match="FREEZE_AT=1 freezes the CLIP ViT.*FREEZE_AT 0"):
        build(tiny_vit_config, ["MODEL.BACKBONE.FREEZE_AT", 1])
    with pytest.raises(ValueError, match="needs CLIP ViTs.*CLIPResNet.*build_clip_vit_backbone"):
        build(tiny_clip_config, ["MODEL.BACKBONE.NAME", "build_clip_resnet_backbone",
                                 "MODEL.RESNETS.OUT_FEATURES", "['res4']"])
    model = build(tiny_vit_config).train()
    with pytest.raises(ImageTooSmallError, match="input 1: an image of 6x40 pixels is smaller than one 8x8 patch"):
        model([image_input(32, 32), image_input(6, 40)])


FVIT = "configs/clipself/FViT_ViT-B-16_ovd.yaml"


def test_fvit_trains_on_the_frozen_clipself_vit(tiny_vit_config):
    """The F-ViT-style detector takes a CLIPSelf checkpoint (student backbone.* onto
    backbone.bottom_up.*), keeps the ViT frozen and trains the pyramid and the heads."""
    from helpers import tiny_model

    student = build(tiny_vit_config)
    with torch.no_grad():
        student.backbone.proj.add_(0.5)  # a student that moved away from the CLIP weights
    det = tiny_model(FVIT, tiny_vit_config, extra=["MODEL.CLIP.TEXT_EMB_DIM", 24])
    det.load_state_dict(student.state_dict(), strict=False)
    assert torch.equal(det.backbone.bottom_up.proj, student.backbone.proj)
    det.train()
    from detectron2.utils.events import EventStorage

    with EventStorage(0):
        losses = det([image_input(96, 128, boxes=[[4, 4, 60, 50], [30, 20, 120, 90]]),
                      image_input(64, 80, boxes=[[0, 0, 40, 40]], seed=1)])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is None for p in det.backbone.bottom_up.parameters())
    # the boxes of these small images all pool from the finest RoI level, p3 (stride 8: the tiny ViT's map)
    p3 = det.backbone.stages[det.backbone._out_features.index("p3")]
    assert all(p.grad is not None for p in p3.parameters())
    assert any(p.grad is not None for p in det.roi_heads.parameters())
