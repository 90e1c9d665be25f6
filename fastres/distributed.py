"""torchrun support: one process per GPU, DistributedDataParallel, rank 0 writes."""

from __future__ import annotations

import atexit
import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistInfo:
    """Join the process group torchrun describes in the environment; a lone process is
    rank 0 of 1 and touches no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend)
    return DistInfo(rank, world, device)


def wrap(model: nn.Module, dist: DistInfo) -> nn.Module:
    """DDP around the model when there are several processes; the plain module otherwise.
    Checkpoints always save the plain module's state dict."""
    if dist.world_size == 1:
        return model
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def all_sum(tensor: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Sum a metric over processes (in place); a no-op for one process."""
    if dist.world_size > 1:
        tdist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool, dist: DistInfo) -> bool:
    """True on every process when it is True on any: processes stop at the same step."""
    if dist.world_size == 1:
        return flag
    t = torch.tensor(float(flag), device=dist.device)
    tdist.all_reduce(t)
    return t.item() > 0


# Process groups left by `teardown`, kept until exit and then dropped through their Python
# objects. A gloo group's destructor joins its worker threads, and one of them may still need the
# GIL to free the tensors of the last collective. Dropped from Python, the group's destructor
# releases the GIL first (torch 2.8 on; before, it keeps it, but by exit the workers have long
# finished). Dropped as the last reference of a DDP reducer (a run that raised: its traceback
# holds the model), it keeps the GIL, and the process hangs: about 1 run in 7 of
# tests/test_distributed.py's refusal on rank 0 did, before this.
_kept_until_exit: list[tdist.ProcessGroup] = []


@atexit.register
def _drop_kept_groups() -> None:
    """Drop the groups `teardown` kept, the models first: an uncaught error's traceback, which
    the interpreter keeps in `sys.last_*` and which holds the model and its reducer, goes, and
    the collector frees the model's cycles; the groups' own references are then the last. At
    exit but before the interpreter finalises, while the workers can still take the GIL."""
    if _kept_until_exit:
        sys.last_type = sys.last_value = sys.last_traceback = None
        if hasattr(sys, "last_exc"):  # Python 3.12 on
            sys.last_exc = None
        gc.collect()
        _kept_until_exit.clear()


def teardown(dist: DistInfo) -> None:
    """Leave the process group; the group itself lives on until exit (see `_kept_until_exit`)."""
    if dist.world_size > 1 and tdist.is_initialized():
        _kept_until_exit.append(tdist.group.WORLD)
        tdist.destroy_process_group()
