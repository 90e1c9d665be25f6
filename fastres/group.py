"""Fused groups of runs (`--seeds 0,1,2`): which runs may train as one step, and the
checkpoint set a group resumes from.

Every run of a group keeps its own directory in a single run's format, plus `group.json`
naming the group's run directories (written when the group starts, so `--resume` of any
run finds the others even before their first checkpoint). A group's checkpoints are
written one run after another, so a kill can come between two of them; each run of a
group of several therefore keeps its previous checkpoint until its next one is complete
(`checkpoint.PREVIOUS`), and a group resumes from the latest step that every run holds. A
run saved only once may also start again from iteration 0, the step before its first
checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastres import atomic, checkpoint
from fastres.config import RunConfig, free_in_group
from fastres.errors import RunError, UsageError


def check(cfgs: Sequence[RunConfig], world_size: int = 1) -> None:
    """Refuse, in one line, runs that cannot train as one fused step (`--loader dali` is
    refused where the loaders are built)."""
    if len(cfgs) < 2:
        return
    first = cfgs[0]
    for cfg in cfgs[1:]:
        differ = [f.name for f in dataclasses.fields(RunConfig)
                  if f.name not in free_in_group() and getattr(cfg, f.name) != getattr(first, f.name)]
        if differ:
            raise UsageError(f"runs {first.out} and {cfg.out} differ in {', '.join(differ)}: only runs alike but "
                             "for their seed can be fused (one graph, one schedule)")
    seeds, outs = [c.seed for c in cfgs], [str(Path(c.out)) for c in cfgs]
    if len(set(seeds)) < len(seeds) or len(set(outs)) < len(outs):
        raise UsageError(f"fused runs need distinct seeds and run directories, got seeds {seeds}")
    if world_size > 1:
        raise UsageError("fused runs (several seeds) train in one process on one device: run them without torchrun, "
                         "or one seed per torchrun job")
    if first.val_split:
        raise UsageError("--val-split holds out different images for each seed: fused runs share one training set; "
                         "train these seeds one after another (--fuse off)")


def plan(cfgs: list[RunConfig], fuse: str, device_type: str, world_size: int = 1,
         max_size: int | None = None) -> tuple[list[list[RunConfig]], str | None]:
    """How to train runs alike but for their seed: groups trained one after another, each
    fused into one step, and a note when the choice is not what was asked. `fuse`: "on",
    "off", or "auto": fused on a GPU, where small models leave the device idle; one after
    another on a CPU, where a fused step measured slower (README, "Fused runs"), under
    torchrun, where each run is already spread over the processes, and with DALI."""
    if len(cfgs) <= 1 or fuse == "off":
        return [[cfg] for cfg in cfgs], None
    if fuse == "auto" and (device_type != "cuda" or world_size > 1 or cfgs[0].loader == "dali"):
        why = ("under torchrun" if world_size > 1 else "--loader dali feeds one run" if cfgs[0].loader == "dali"
               else "on a CPU, where a fused step measured slower")
        return [[cfg] for cfg in cfgs], (f"training the {len(cfgs)} seeds one after another ({why}; "
                                         "--fuse on fuses them where it can)")
    size = max_size or len(cfgs)
    return [cfgs[i:i + size] for i in range(0, len(cfgs), size)], None


def member_paths(run_dir: Path, group: Sequence[str]) -> list[Path]:
    """The group's run directories as `run_dir`'s group.json names them (relative to it)."""
    return [Path(os.path.normpath(run_dir / rel)) for rel in group]


def write_group(run_dir: Path, outs: Sequence[str]) -> None:
    """Name a run's group in its directory (paths relative to it, so a folder of runs can be
    moved as a whole); a run trained alone has no group file."""
    if len(outs) > 1:
        atomic.write_json(run_dir / checkpoint.GROUP, {"runs": [os.path.relpath(out, run_dir) for out in outs]})
    else:
        (run_dir / checkpoint.GROUP).unlink(missing_ok=True)


@dataclasses.dataclass
class Saved:
    """What one run directory holds: its config and its checkpoints, newest first."""

    path: Path
    config: RunConfig
    states: list[dict[str, Any]]

    @property
    def steps(self) -> set[int]:
        """Steps this run can resume from; 0 (a fresh start) while it has been saved once at most."""
        steps = {state["step"] for state in self.states}
        return steps | {0} if len(self.states) < 2 else steps

    @property
    def group(self) -> list[Path]:
        """The run directories this run was last trained with (itself alone if not fused)."""
        try:
            return member_paths(self.path, checkpoint.read_json(self.path / checkpoint.GROUP)["runs"])
        except FileNotFoundError:
            return [self.path]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RunError(f"{self.path / checkpoint.GROUP}: unreadable ({e})") from None

    def at(self, step: int) -> dict[str, Any] | None:
        """The checkpoint at `step`; None for a fresh start."""
        return next((s for s in self.states if s["step"] == step), None)


def read(path: Path) -> Saved:
    """A run directory's config and checkpoints (current, then previous); a run killed
    before its first checkpoint has its config.json alone."""
    states = [checkpoint.load(file) for file in checkpoint.saved_files(path)]
    if states:
        return Saved(path, checkpoint.config_of(states[0]), states)
    try:
        config = RunConfig.from_dict(checkpoint.read_json(path / checkpoint.CONFIG))
    except (OSError, ValueError, TypeError) as e:
        raise RunError(f"{path}: not a run directory (no {checkpoint.CHECKPOINT}; {checkpoint.CONFIG}: {e})") from None
    return Saved(path, config, [])


def diverged(run_dir: Path) -> bool:
    """Whether a run stopped on divergence (its metrics end with the record that says so)."""
    records = checkpoint.MetricsLog(run_dir).read()
    return bool(records) and "diverged" in records[-1]


def resume_point(dirs: Sequence[Path]) -> tuple[list[Saved], int]:
    """The runs to resume together and the step they resume from. One directory resumes
    the whole group its group.json names (less any run that diverged); several must be
    runs of one group."""
    saved = [read(Path(d)) for d in dirs]
    if len(saved) == 1 and len(saved[0].group) > 1:
        members = [d for d in saved[0].group if not diverged(d)]  # a run that diverged was dropped from its group
        print(f"fastres: {dirs[0]} was trained fused: resuming its group ({', '.join(map(str, members))})",
              file=sys.stderr)
        saved = [read(d) for d in members]
    names = {Path(os.path.normpath(s.path)) for s in saved}
    for s in saved:
        if not names <= set(s.group):
            raise UsageError(f"{s.path} was trained in a group of {len(s.group)} ({', '.join(map(str, s.group))}), "
                             f"not with {', '.join(str(o.path) for o in saved if o is not s)}: resume one group at a "
                             "time")
    common = set.intersection(*(s.steps for s in saved))
    if not common:
        held = "; ".join(f"{s.path}: {sorted(s.steps)}" for s in saved)
        raise RunError(f"the runs hold no checkpoint step in common, so they cannot resume as a group ({held})")
    return saved, max(common)


def states_at(saved: list[Saved], step: int) -> list[dict[str, Any]] | None:
    """The runs' checkpoints at `step`, to resume from; None at step 0, a fresh start, after
    removing what a group killed while its first checkpoints were written has left."""
    if step > 0:
        return [s.at(step) for s in saved]
    for file in (f for s in saved for f in checkpoint.saved_files(s.path)):
        file.unlink()
    return None
