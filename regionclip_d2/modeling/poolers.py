"""RoIAlign over several CPU threads.

torchvision's CPU RoIAlign kernel runs on one thread whatever ``torch.get_num_threads()``
says, so with 1000 regions it becomes a visible share of zero-shot inference. Each region
is pooled independently, so splitting the regions over threads gives identical results.
"""
import concurrent.futures
import os
import threading
from typing import Optional

import torch
from torch import nn

from detectron2.layers import ROIAlign
from detectron2.modeling.poolers import ROIPooler

_POOL: Optional[concurrent.futures.ThreadPoolExecutor] = None
_POOL_LOCK = threading.Lock()


def _executor(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="roialign")
        return _POOL


def _forget_pool():  # a forked child (e.g. a DataLoader worker) must not use the parent's threads
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)


class ThreadedROIAlign(nn.Module):
    """A detectron2 :class:`ROIAlign` whose regions are split over ``torch.get_num_threads()``
    threads on CPU (from ``min_regions`` regions on); elsewhere it is the wrapped module.
    Results (and gradients) are identical to the wrapped module's."""

    def __init__(self, inner: ROIAlign, min_regions: int = 64, slice: int = 32):
        super().__init__()
        self.inner = inner
        self.min_regions = min_regions
        self.slice = slice

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        threads = torch.get_num_threads()
        if input.device.type != "cpu" or threads <= 1 or rois.shape[0] < max(self.min_regions, 2):
            return self.inner(input, rois)
        # torchvision's kernel makes its input contiguous on every call: once here, not once per
        # slice (a channels-last feature map from the folded backbone would be copied per slice)
        input = input.contiguous()
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
        # autocast is per thread too: the workers get the caller's, so that torchvision's
        # autocast wrapper pools bf16 input in float32 (its CPU kernel has no bf16)
        autocast = torch.is_autocast_enabled("cpu")
        autocast_dtype = torch.get_autocast_dtype("cpu")

        def like_caller():
            return torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast)

        if grad and input.requires_grad:  # autograd: one part per thread, concatenated

            def pool(part):  # grad mode is per thread: carry the caller's over
                with torch.set_grad_enabled(True), like_caller():
                    return self.inner(input, part)

            return torch.cat(list(_executor(threads).map(pool, torch.tensor_split(rois, threads))), dim=0)
        # no autograd: threads fill one output in small slices (no second copy of the output)
        first = self.inner(input, rois[:self.slice])
        out = first.new_empty((rois.shape[0],) + first.shape[1:])
        out[:first.shape[0]] = first
        del first
        starts = range(self.slice, rois.shape[0], self.slice)

        def fill(start):
            with (torch.inference_mode() if inference else torch.no_grad()), like_caller():
                out[start:start + self.slice] = self.inner(input, rois[start:start + self.slice])

        list(_executor(threads).map(fill, starts))
        return out

    def __repr__(self):
        return f"Threaded{self.inner!r}"


def thread_roi_align(pooler: ROIPooler) -> ROIPooler:
    """Wrap the RoIAlign levels of a detectron2 ``ROIPooler`` in :class:`ThreadedROIAlign`
    (in place; other pooler types are left alone). Returns ``pooler``."""
    for i, level in enumerate(pooler.level_poolers):
        if isinstance(level, ROIAlign):
            pooler.level_poolers[i] = ThreadedROIAlign(level)
    return pooler
