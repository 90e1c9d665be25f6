"""A run's checkpoint as a typed object, with its one writer and its one validating reader.

This module is the only place that knows the checkpoint's keys: everything else reads and
writes `Checkpoint` fields. A file that unpickles but is not what fastres wrote (a missing
field, a field of the wrong type, a config that no run can have) is one line naming the
file and the field, never a traceback later.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastres import atomic
from fastres.config import RunConfig, is_int, is_number
from fastres.errors import RunError, UsageError

# What a checkpoint holds. 0: before it had a version; 1: adds "normalization" (mean, std).
FORMAT = 1


@dataclass
class Normalization:
    """The per-pixel (32, 32, 3) or per-channel (1, 1, 3) mean and std the run trained with."""

    mean: torch.Tensor
    std: torch.Tensor


@dataclass
class Checkpoint:
    """One run at one step, in a single run's format (a fused group writes one per run)."""

    config: RunConfig
    step: int  # iterations done
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch.optim.SGD.state_dict()
    scaler: dict[str, Any]  # torch.amp.GradScaler.state_dict() (empty when disabled)
    loss_sum: torch.Tensor  # the metric window's sums since the last log point, over processes
    wrong_sum: torch.Tensor
    window: int  # steps in that window
    train_time: float  # seconds of training (evaluation and checkpoints excluded)
    wall_time: float
    normalization: Normalization | None  # None: format 0, from before it was saved
    format: int = FORMAT


def encode(ckpt: Checkpoint) -> dict[str, Any]:
    """The dict `torch.save` writes: tensors and plain values only, so `weights_only` reads it."""
    state = {f.name: getattr(ckpt, f.name) for f in dataclasses.fields(Checkpoint)}
    state["config"] = ckpt.config.to_dict()
    state["format"] = FORMAT
    if ckpt.normalization is not None:
        state["normalization"] = {"mean": ckpt.normalization.mean, "std": ckpt.normalization.std}
    return state


def write(path: Path, ckpt: Checkpoint) -> None:
    """Write atomically: a kill leaves the previous file or this one, never half of one."""
    atomic.torch_save(path, encode(ckpt))


def load_file(path: Path, what: str) -> Any:
    """`torch.load` of tensors only, on the CPU; a damaged file is one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise RunError(f"{path}: unreadable {what} ({type(e).__name__})") from None


def read(path: Path) -> Checkpoint:
    """The checkpoint in `path`, validated field by field; one RunError line if it is not one."""
    return decode(load_file(path, "checkpoint"), path)


def _tensor_dict(v: Any) -> bool:
    return isinstance(v, dict) and bool(v) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                                  for k, t in v.items())


def _optimizer(v: Any) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("state"), dict) and isinstance(v.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in v["param_groups"])
            and all(isinstance(st, dict) and all(isinstance(t, torch.Tensor) for t in st.values())
                    for st in v["state"].values()))


def _one_number(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.numel() == 1


# Each field's check and what the message says it should be.
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "step": (lambda v: is_int(v) and v >= 0, "an iteration count (an integer >= 0)"),
    "model": (_tensor_dict, "a state dict of tensors"),
    "optimizer": (_optimizer, "an optimizer state dict (state, param_groups)"),
    "scaler": (lambda v: isinstance(v, dict), "a GradScaler state dict"),
    "loss_sum": (_one_number, "a one-element tensor"),
    "wrong_sum": (_one_number, "a one-element tensor"),
    "window": (lambda v: is_int(v) and v >= 0, "a step count (an integer >= 0)"),
    "train_time": (lambda v: is_number(v) and 0 <= v < math.inf, "seconds (a finite number >= 0)"),
    "wall_time": (lambda v: is_number(v) and 0 <= v < math.inf, "seconds (a finite number >= 0)"),
}


def is_checkpoint(state: Any) -> bool:
    """Whether what `torch.load` returned claims to be a fastres checkpoint (not an export)."""
    return isinstance(state, dict) and "config" in state and "model" in state


def decode(state: Any, source: Path) -> Checkpoint:
    """A `Checkpoint` from what `torch.load` returned, or one line naming the field at fault."""
    if not is_checkpoint(state):
        raise RunError(f"{source}: not a fastres checkpoint")
    version = state.get("format", 0)
    if not is_int(version) or version < 0:
        raise RunError(f"{source}: field 'format' is {version!r}, not a checkpoint format number")
    if version > FORMAT:
        raise RunError(f"{source}: written by a newer fastres (checkpoint format {version}; this one reads "
                       f"formats up to {FORMAT}): update fastres")
    config = read_config(state["config"], source)
    for name, (ok, what) in CHECKS.items():
        if name not in state:
            raise RunError(f"{source}: no field {name!r}: not a complete fastres checkpoint")
        if not ok(state[name]):
            raise RunError(f"{source}: field {name!r} should be {what}, got {type(state[name]).__name__}")
    if state["step"] > config.iters:
        raise RunError(f"{source}: field 'step' is {state['step']}, past the run's {config.iters} iterations")
    values = {name: state[name] for name in CHECKS}
    values["train_time"], values["wall_time"] = float(values["train_time"]), float(values["wall_time"])
    return Checkpoint(config=config, normalization=_normalization(state.get("normalization"), source), **values)


def read_config(raw: Any, source: Path) -> RunConfig:
    """A run's config from its saved dict (a checkpoint's, or config.json's), validated."""
    try:
        return RunConfig.from_dict(raw)
    except (ValueError, UsageError) as e:
        raise RunError(f"{source}: config: {e}") from None


def _normalization(raw: Any, source: Path) -> Normalization | None:
    if raw is None:
        return None
    if not (isinstance(raw, dict) and all(isinstance(raw.get(k), torch.Tensor) for k in ("mean", "std"))):
        raise RunError(f"{source}: field 'normalization' should hold tensors 'mean' and 'std'")
    mean, std = raw["mean"], raw["std"]
    if not {tuple(mean.shape), tuple(std.shape)} <= {(32, 32, 3), (1, 1, 3)}:  # per pixel or per channel
        raise RunError(f"{source}: field 'normalization' has shapes {tuple(mean.shape)} and {tuple(std.shape)}; "
                       "expected (32, 32, 3) or (1, 1, 3)")
    if not (bool(mean.isfinite().all()) and bool((std > 0).all()) and bool(std.isfinite().all())):
        raise RunError(f"{source}: field 'normalization' holds a non-finite mean or a std that is not positive")
    return Normalization(mean, std)

