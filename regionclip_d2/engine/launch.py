"""Multi-process launch that also works on CPU machines.

On GPUs this is detectron2's ``launch`` (one process per GPU, NCCL). Without CUDA,
detectron2 0.6's launcher refuses to start, so we spawn the same process layout with
the gloo backend: ``--num-gpus N`` then means N CPU processes.
"""
import logging
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import detectron2.utils.comm as comm
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import _find_free_port  # private detectron2 API: used once, below

logger = logging.getLogger(__name__)


def launch(main_func, num_processes_per_machine, num_machines=1, machine_rank=0, dist_url=None, args=(),
           timeout=timedelta(minutes=30)):
    if torch.cuda.is_available() or num_processes_per_machine * num_machines <= 1:
        return d2_launch(main_func, num_processes_per_machine, num_machines=num_machines,
                         machine_rank=machine_rank, dist_url=dist_url, args=args, timeout=timeout)
    world_size = num_machines * num_processes_per_machine
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("--dist-url auto works on one machine only: give tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.spawn(_cpu_worker, nprocs=num_processes_per_machine,
             args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args, timeout),
             daemon=False)


def _cpu_worker(local_rank, main_func, world_size, per_machine, machine_rank, dist_url, args, timeout):
    rank = machine_rank * per_machine + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=rank,
                            timeout=timeout)
    for i in range(world_size // per_machine):
        group = dist.new_group(list(range(i * per_machine, (i + 1) * per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    try:
        main_func(*args)
        # every process is done before any tears its connections down: a gloo peer torn down while
        # the other still talks aborts that process ("terminate called without an active exception")
        comm.synchronize()
    finally:
        dist.destroy_process_group()
