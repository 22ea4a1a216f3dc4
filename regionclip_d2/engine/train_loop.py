"""The training step of regionclip_d2: detectron2's step, plus per-step seeding (exact
resume) and a guard against non-finite losses."""
import contextlib
import logging
import time
from typing import Optional

import torch

import detectron2.utils.comm as comm
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import get_event_storage

from ..data.loader import seed_all

logger = logging.getLogger(__name__)

NONFINITE_POLICIES = ("error", "skip")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite."""


def _batch_files(data, limit: int = 4) -> str:
    names = [str(d.get("file_name", "?")) for d in data if isinstance(d, dict)] if isinstance(data, list) else []
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _amp_dtype(name: str, device_type: str) -> torch.dtype:
    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"SOLVER.AMP.DTYPE={name!r}: use one of {sorted(dtypes)}")
    if device_type == "cpu" and name == "float16":
        raise ValueError("SOLVER.AMP.DTYPE float16 trains on CUDA only (it needs a gradient scaler and fp16 "
                         "kernels): on CPU set SOLVER.AMP.DTYPE bfloat16, or SOLVER.AMP.ENABLED False")
    return dtypes[name]


class GuardedTrainer(SimpleTrainer):
    """:class:`detectron2.engine.SimpleTrainer` (or, with ``amp``, its AMP variant: autocast on
    ``device`` in ``amp_dtype``, with a gradient scaler for float16) that

    * seeds Python, NumPy and torch from ``(seed, iteration, rank)`` before the forward
      pass, so the model's own sampling (proposal sampling, random regions) does not depend
      on history and a resumed run repeats an uninterrupted one;
    * checks every loss term before the backward pass: a NaN or infinite term raises
      :class:`NonFiniteLossError` naming the iteration, the term and the batch's files
      (``nonfinite="error"``), or the batch is skipped, counted in the event storage as
      ``nonfinite_skipped`` and logged (``nonfinite="skip"``, at most ``max_skips`` times).
      All processes take the same decision.
    """

    def __init__(self, model, data_loader, optimizer, *, seed: Optional[int] = None, nonfinite: str = "error",
                 max_skips: int = 100, amp: bool = False, amp_dtype: str = "float16", device: str = "cuda",
                 grad_scaler=None):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"SOLVER.NONFINITE_LOSS={nonfinite!r}: use one of {NONFINITE_POLICIES}")
        super().__init__(model, data_loader, optimizer)
        self.seed, self.nonfinite, self.max_skips = seed, nonfinite, max_skips
        self.num_skipped = 0
        self.amp = amp
        self.amp_device = torch.device(device).type
        self.amp_dtype = _amp_dtype(amp_dtype, self.amp_device) if amp else None
        if amp and grad_scaler is None and self.amp_dtype == torch.float16:
            grad_scaler = torch.amp.GradScaler(self.amp_device)  # bf16 has float32's range: no scaling
        self.grad_scaler = grad_scaler

    @classmethod
    def from_config(cls, cfg, model, data_loader, optimizer, seed: Optional[int] = None):
        """The training step as the config sets it up (SOLVER.NONFINITE_LOSS,
        SOLVER.MAX_NONFINITE_SKIPS, SOLVER.AMP.ENABLED / DTYPE on MODEL.DEVICE)."""
        return cls(model, data_loader, optimizer, seed=seed, nonfinite=cfg.SOLVER.NONFINITE_LOSS,
                   max_skips=cfg.SOLVER.MAX_NONFINITE_SKIPS, amp=cfg.SOLVER.AMP.ENABLED,
                   amp_dtype=cfg.SOLVER.AMP.DTYPE, device=cfg.MODEL.DEVICE)

    def _bad_terms(self, loss_dict):
        bad = {k: float(v.detach().float().sum()) for k, v in loss_dict.items()
               if not bool(torch.isfinite(v.detach()).all())}
        if comm.get_world_size() > 1:  # every process must skip (or stop) together
            device = next(iter(loss_dict.values())).device
            flag = torch.tensor([1.0 if bad else 0.0], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and not bad:
                bad = {"(on another process)": float("nan")}
        return bad

    def run_step(self):
        assert self.model.training, "[GuardedTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.seed is not None:
            seed_all(self.seed, 1 << 20, self.iter, comm.get_rank())
        autocast = torch.autocast(self.amp_device, dtype=self.amp_dtype) if self.amp else contextlib.nullcontext()
        with autocast:
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                loss_dict = {"total_loss": loss_dict}
            losses = sum(loss_dict.values())
        bad = self._bad_terms(loss_dict)
        if bad:
            terms = ", ".join(f"{k}={v}" for k, v in bad.items())
            where = f"at iteration {self.iter} (batch: {_batch_files(data) or 'n/a'})"
            if self.nonfinite == "error":
                raise NonFiniteLossError(
                    f"non-finite loss {terms} {where}; training stopped before the update, so the last "
                    "checkpoint is intact. Lower SOLVER.BASE_LR or check these images, or set "
                    "SOLVER.NONFINITE_LOSS skip to skip such batches")
            self.num_skipped += 1
            self.optimizer.zero_grad()
            logger.warning("skipping the batch %s: non-finite loss %s (%d skipped so far)", where, terms,
                           self.num_skipped)
            if comm.is_main_process():
                get_event_storage().put_scalar("nonfinite_skipped", self.num_skipped, smoothing_hint=False)
            if self.num_skipped > self.max_skips:
                raise NonFiniteLossError(
                    f"{self.num_skipped} batches with a non-finite loss were skipped, more than "
                    f"SOLVER.MAX_NONFINITE_SKIPS={self.max_skips} (latest {terms} {where}): the run is diverging; "
                    "lower SOLVER.BASE_LR or raise the limit")
            return
        self.optimizer.zero_grad()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()
        self._write_metrics(loss_dict, data_time)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def state_dict(self):
        ret = super().state_dict()
        ret["nonfinite_skipped"] = self.num_skipped
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.num_skipped = int(state_dict.get("nonfinite_skipped", 0))
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
