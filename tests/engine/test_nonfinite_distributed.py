"""SOLVER.NONFINITE_LOSS skip, set through the config, with 2 gloo processes: a NaN on one
process makes every process skip that batch together (no update anywhere, no hang), and the
run ends exactly as a run that never saw the batch."""
import itertools
import os
from datetime import timedelta

import torch
from torch import nn

from detectron2.utils.events import EventStorage

from regionclip_d2 import get_regionclip_cfg
from regionclip_d2.engine.launch import launch
from regionclip_d2.engine.train_loop import GuardedTrainer

STEPS = 5


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)

    def forward(self, batch):
        y = self.lin(torch.stack([d["x"] for d in batch])).mean()
        return {"loss_cls": y ** 2 + torch.tensor(batch[0]["poison"])}


def _batches(rank, poison_at, skip_batch):
    for i in itertools.count():
        if i == skip_batch:
            continue
        yield [{"file_name": f"r{rank}_{i}.png", "x": torch.tensor([1.0 + i, 2.0 + rank]),
                "poison": poison_at.get((rank, i), 0.0)}]


def _worker(out_dir, poison_at, skip_batch, steps):
    import detectron2.utils.comm as comm

    rank = comm.get_rank()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(Toy())
    cfg = get_regionclip_cfg(None, ["SOLVER.NONFINITE_LOSS", "skip", "SOLVER.MAX_NONFINITE_SKIPS", 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = GuardedTrainer.from_config(cfg, model, _batches(rank, poison_at, skip_batch), opt, seed=0)
    with EventStorage(0) as storage:
        for i in range(steps):
            trainer.iter = storage.iter = i
            trainer.run_step()
    torch.save({"weights": model.module.state_dict(), "skipped": trainer.num_skipped},
               os.path.join(out_dir, f"rank{rank}.pt"))


def _run(tmp_path, name, poison_at, skip_batch, steps):
    out = tmp_path / name
    out.mkdir()
    # a process left waiting in a collective fails after the timeout instead of hanging
    launch(_worker, 2, args=(str(out), poison_at, skip_batch, steps), timeout=timedelta(seconds=60))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_nonfinite_skip_is_taken_by_all_processes_together(tmp_path):
    # batch 2 is poisoned on process 1 only: both processes skip it (5 steps = 4 updates)
    poisoned = _run(tmp_path, "poisoned", {(1, 2): float("nan")}, None, STEPS)
    # the reference never sees batch 2 (4 steps over batches 0, 1, 3, 4)
    reference = _run(tmp_path, "reference", {}, 2, STEPS - 1)
    assert [r["skipped"] for r in poisoned] == [1, 1]
    for got, want in zip(poisoned, reference):
        for k in want["weights"]:
            assert torch.equal(got["weights"][k], want["weights"][k]), k
    assert all(torch.equal(poisoned[0]["weights"][k], poisoned[1]["weights"][k]) for k in poisoned[0]["weights"])
