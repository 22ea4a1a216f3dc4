"""Training speed options keep the loss curve (issue 16, training steps): 50 transfer steps of a
tiny C4 detector on synthetic-world images under bf16 autocast (SOLVER.AMP.DTYPE bfloat16, on
CPU) and in channels-last memory format (MODEL.CLIP.CHANNELS_LAST) follow the fp32 run's losses
within stated tolerances; float16 on CPU is refused with the fix."""
import itertools

import numpy as np
import pytest
import torch
from helpers import tiny_cfg

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from regionclip_d2.engine.train_loop import GuardedTrainer
from regionclip_d2.synthetic.world import generate_sample
from regionclip_d2.synthetic.world_config import WorldConfig

STEPS = 50
CONFIG = "configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_ovd.yaml"


def _world_batches(world: WorldConfig, images_per_batch: int = 2):
    """Batches of the world's training images with their base-class boxes (as transfer trains)."""
    base = list(world.base)
    samples = []
    for i in range(8):
        image, objects, _ = generate_sample(world, "train", i)
        objects = [o for o in objects if o.shape in base]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (o.bbox for o in objects)],
                             dtype=torch.float32).reshape(-1, 4)
        s = world.image_size
        inst = Instances((s, s), gt_boxes=Boxes(boxes),
                         gt_classes=torch.tensor([base.index(o.shape) for o in objects], dtype=torch.long))
        samples.append({"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
                        "height": s, "width": s, "instances": inst, "file_name": f"train_{i}.png"})
    for i in itertools.count():
        yield [samples[(i * images_per_batch + k) % len(samples)] for k in range(images_per_batch)]


def _losses(tiny_clip_config, world, extra=(), amp_dtype=None):
    base = world.base
    cfg = tiny_cfg(CONFIG, tiny_clip_config, vocabulary=",".join(base), extra=[
        "MODEL.CLIP.OFFLINE_RPN_CONFIG", "configs/synthetic/rpn_R_18_FPN_world.yaml",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", 50, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16, *extra])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.002, momentum=0.9)
    trainer = GuardedTrainer(model, _world_batches(world), opt, seed=3, amp=amp_dtype is not None,
                             amp_dtype=amp_dtype or "float16", device="cpu")
    curve = []
    with EventStorage(0) as storage:
        for i in range(STEPS):
            trainer.iter = storage.iter = i
            trainer.run_step()
            curve.append(sum(storage.latest()[k][0] for k in ("loss_cls", "loss_box_reg")))
    return np.array(curve)


def test_channels_last_and_bf16_training_follow_the_fp32_loss_curve(tiny_clip_config):
    world = WorldConfig(image_size=96, seed=5)
    ref = _losses(tiny_clip_config, world)
    assert np.isfinite(ref).all()
    assert ref[-10:].mean() < 0.8 * ref[:5].mean()  # the detector learns: the comparison means something
    # channels-last: the same arithmetic in another order: equal to fp32 rounding over 50 steps
    cl = _losses(tiny_clip_config, world, extra=["MODEL.CLIP.CHANNELS_LAST", True])
    assert np.abs(cl - ref).max() <= 1e-3 * ref.max(), np.abs(cl - ref).max()
    # bf16 autocast: 8-bit mantissas; the curve stays within 2% of its scale step by step, and its
    # last 10 steps' mean within 2% of fp32's
    bf16 = _losses(tiny_clip_config, world, amp_dtype="bfloat16")
    assert np.isfinite(bf16).all()
    assert np.abs(bf16 - ref).max() <= 0.02 * ref.max(), np.abs(bf16 - ref).max()
    assert abs(bf16[-10:].mean() - ref[-10:].mean()) <= 0.02 * ref[-10:].mean()


def test_float16_training_on_cpu_is_refused_with_the_fix():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="on CPU set SOLVER.AMP.DTYPE bfloat16"):
        GuardedTrainer(model, iter([]), torch.optim.SGD(model.parameters(), lr=0.1), amp=True,
                       amp_dtype="float16", device="cpu")
    with pytest.raises(ValueError, match="use one of"):
        GuardedTrainer(model, iter([]), torch.optim.SGD(model.parameters(), lr=0.1), amp=True,
                       amp_dtype="half", device="cpu")
