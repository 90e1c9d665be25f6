"""Fused groups of runs (`--seeds 0,1,2`): which runs may train as one step, and how a
set of runs is split into groups.

Every run of a group keeps its own directory in a single run's format, plus `group.json`
naming the group's run directories (written when the group starts, so `--resume` of any
run finds the others even before their first checkpoint). A group's checkpoints are
written one run after another, so a kill can come between two of them; each run of a
group of several therefore keeps its previous checkpoint until its next one is complete,
and a group resumes from the latest step that every run holds (`fastres.rundir`, which
owns all of a run directory's files).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from fastres.config import RunConfig, free_in_group
from fastres.errors import UsageError


def check(cfgs: Sequence[RunConfig], world_size: int = 1) -> None:
    """Refuse, in one line, runs that cannot train as one fused step (`--loader dali` is
    refused where the loaders are built). They may differ in their seed and hyperparameters
    (`fastres.config.ROLES`' free fields), never in the graph or the data: one --val-split,
    chosen by its own --val-seed, serves them all."""
    if len(cfgs) < 2:
        return
    first = cfgs[0]
    for cfg in cfgs[1:]:
        differ = [f.name for f in dataclasses.fields(RunConfig)
                  if f.name not in free_in_group() and getattr(cfg, f.name) != getattr(first, f.name)]
        if differ:
            raise UsageError(f"runs {first.out} and {cfg.out} differ in {', '.join(differ)}: only runs alike but "
                             "for their seed and hyperparameters (--sweep) can be fused (one graph, one training set)")
    outs = [str(Path(c.out)) for c in cfgs]
    if len(set(outs)) < len(outs):
        raise UsageError(f"fused runs need distinct run directories, got {', '.join(outs)}")
    alike = [dataclasses.replace(c, out="") for c in cfgs]
    for i, a in enumerate(alike):
        if a in alike[i + 1:]:
            raise UsageError(f"runs {cfgs[i].out} and {cfgs[alike.index(a, i + 1)].out} would be the same run "
                             "(same seed, same hyperparameters)")
    if world_size > 1:
        raise UsageError("fused runs (several seeds or a sweep) train in one process on one device: run them without "
                         "torchrun, or one run per torchrun job")
    ends = sorted({c.iters for c in cfgs})
    off = [n for n in ends[:-1] if n % first.log_every]
    if off:  # a member leaves the group at its last iteration, where every member's metrics window is read
        raise UsageError(f"runs of one fused group that stop at different --iters must stop on a log point, "
                         f"a multiple of --log-every {first.log_every}: {', '.join(map(str, off))} is not "
                         "(or train them one after another: --fuse off)")


def plan(cfgs: list[RunConfig], fuse: str, device_type: str, world_size: int = 1,
         max_size: int | None = None) -> tuple[list[list[RunConfig]], str | None]:
    """How to train runs alike but for their seed and hyperparameters: groups trained one after another, each
    fused into one step, and a note when the choice is not what was asked. `fuse`: "on",
    "off", or "auto": fused on a GPU, where small models leave the device idle; one after
    another on a CPU, where a fused step measured slower (docs/fused-runs.md), under
    torchrun, where each run is already spread over the processes, and with DALI."""
    if len(cfgs) <= 1 or fuse == "off":
        return [[cfg] for cfg in cfgs], None
    if fuse == "auto" and (device_type != "cuda" or world_size > 1 or cfgs[0].loader == "dali"):
        why = ("under torchrun" if world_size > 1 else "--loader dali feeds one run" if cfgs[0].loader == "dali"
               else "on a CPU, where a fused step measured slower")
        return [[cfg] for cfg in cfgs], (f"training the {len(cfgs)} runs one after another ({why}; "
                                         "--fuse on fuses them where it can)")
    size = max_size or len(cfgs)
    return [cfgs[i:i + size] for i in range(0, len(cfgs), size)], None
