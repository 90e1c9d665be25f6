"""torchrun support: one process per GPU, DistributedDataParallel, rank 0 writes."""

from __future__ import annotations

import atexit
import os
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


# Process groups left by `teardown`, each dropped at exit through its Python object. A gloo group's
# destructor joins its worker threads, and one of them may still need the GIL to free the tensors
# of the last collective: freed from Python, the destructor releases the GIL first; freed as the
# last reference of a DDP reducer (a run that raised: its traceback holds the model), it keeps the
# GIL, and the process hangs (seen once in 14 refusals on rank 0).
_released: list[tdist.ProcessGroup] = []


def teardown(dist: DistInfo) -> None:
    """Leave the process group; the group itself lives on until exit (see `_released`)."""
    if dist.world_size > 1 and tdist.is_initialized():
        if not _released:
            atexit.register(_released.clear)
        _released.append(tdist.group.WORLD)
        tdist.destroy_process_group()
