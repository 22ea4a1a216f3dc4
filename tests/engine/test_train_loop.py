"""The training step: a NaN / inf loss stops the run naming the iteration, the term and the
batch (before any update), or is skipped and counted; per-step seeding."""
import itertools

import pytest
import torch
from torch import nn

from detectron2.utils.events import EventStorage

from regionclip_d2.engine.train_loop import GuardedTrainer, NonFiniteLossError


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)

    def forward(self, batch):
        x = torch.stack([d["x"] for d in batch])
        y = self.lin(x).mean()
        poison = torch.tensor(batch[0]["poison"])
        return {"loss_cls": y ** 2, "loss_box_reg": y.abs() + poison, "loss_draw": torch.rand(()) * 0 + y * 0}


def _loader(poison_at):
    def batches():
        for i in itertools.count():
            yield [{"file_name": f"img{i}.png", "x": torch.ones(2) * (i + 1),
                    "poison": poison_at.get(i, 0.0)}]
    return batches()


def _run(trainer, n):
    with EventStorage(0) as storage:
        for i in range(n):
            trainer.iter = storage.iter = i
            trainer.run_step()
        return storage


def _trainer(poison_at, **kw):
    torch.manual_seed(0)
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return GuardedTrainer(model, _loader(poison_at), opt, **kw)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_stops_naming_iteration_term_and_batch(value):
    t = _trainer({3: value})
    _run(t, 3)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"loss_box_reg=(nan|inf) at iteration 3 \(batch: img3.png\)"
                                                 r".*SOLVER.NONFINITE_LOSS skip"):
        _run_from(t, 3)
    # stopped before the update: the weights are those of the last good step
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())


def _run_from(trainer, i):
    with EventStorage(i) as storage:
        trainer.iter = storage.iter = i
        trainer.run_step()


def test_nonfinite_loss_skipped_and_counted():
    clean = _trainer({})
    _run(clean, 5)
    t = _trainer({2: float("nan")}, nonfinite="skip", max_skips=1)
    storage = _run(t, 5)
    assert t.num_skipped == 1 and t.state_dict()["nonfinite_skipped"] == 1
    assert storage.history("nonfinite_skipped").latest() == 1
    # the skipped batch changed nothing: 4 good steps, not 5
    assert not torch.equal(clean.model.lin.weight, t.model.lin.weight)
    ref = _trainer({})
    ref._data_loader_iter = iter([b for i, b in zip(range(5), _loader({})) if i != 2])
    _run(ref, 4)
    assert torch.allclose(ref.model.lin.weight, t.model.lin.weight)
    # more skips than allowed: a clear error
    t = _trainer({1: float("nan"), 2: float("inf")}, nonfinite="skip", max_skips=1)
    with pytest.raises(NonFiniteLossError,
                       match="2 batches with a non-finite loss were skipped.*MAX_NONFINITE_SKIPS=1"):
        _run(t, 4)
    with pytest.raises(ValueError, match="NONFINITE_LOSS"):
        _trainer({}, nonfinite="ignore")


def test_step_seeding_makes_draws_a_function_of_the_iteration():
    draws = []

    class Drawer(Toy):
        def forward(self, batch):
            draws.append(float(torch.rand(())))
            return super().forward(batch)

    def run(start, n):
        model = Drawer()
        t = GuardedTrainer(model, _loader({}), torch.optim.SGD(model.parameters(), lr=0.01), seed=5)
        with EventStorage(start) as storage:
            for i in range(start, start + n):
                t.iter = storage.iter = i
                t.run_step()

    run(0, 4)
    first = draws[:]
    draws.clear()
    torch.manual_seed(123)  # whatever happened before does not matter
    run(2, 2)
    assert draws == first[2:]
    assert len(set(first)) == 4
