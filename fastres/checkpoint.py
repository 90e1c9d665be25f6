"""Run directories: config, checkpoint, metrics log and results, all written atomically."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from fastres import atomic
from fastres.config import RunConfig
from fastres.errors import RunError

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
# What a checkpoint holds. 0: before it had a version; 1: adds "normalization" (mean, std).
FORMAT = 1


def refuse_overwrite(out: str, resuming: bool) -> None:
    """A new run never writes into a directory that holds another run's checkpoint."""
    if not resuming and (Path(out) / CHECKPOINT).exists():
        raise RunError(f"{out} already holds a run: pass --resume {out}, or choose another --out")


def prepare_run_dir(out: str, resuming: bool) -> Path:
    """Create the run directory and prove it writable; if it is not, remove the folders
    this call made, so a refused run leaves no trace."""
    refuse_overwrite(out, resuming)
    path = Path(out)
    made = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        for folder in made:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise RunError(f"cannot write to run directory {path} ({e.strerror})") from None
    return path


def checkpoint_path(path: str | Path) -> Path:
    """The checkpoint file of a run directory, or the file itself."""
    path = Path(path)
    ckpt = path / CHECKPOINT if path.is_dir() else path
    if not ckpt.is_file():
        raise RunError(f"{path}: no checkpoint ({CHECKPOINT}) to resume or evaluate")
    return ckpt


def save(run_dir: Path, state: dict[str, Any]) -> None:
    atomic.torch_save(run_dir / CHECKPOINT, {"format": FORMAT, **state})


def load(path: str | Path) -> dict[str, Any]:
    ckpt = checkpoint_path(path)
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise RunError(f"{ckpt}: unreadable checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise RunError(f"{ckpt}: not a fastres checkpoint")
    if state.get("format", 0) > FORMAT:
        raise RunError(f"{ckpt}: written by a newer fastres (checkpoint format {state['format']}; this one reads "
                       f"formats up to {FORMAT}): update fastres")
    return state


def config_of(state: dict[str, Any]) -> RunConfig:
    return RunConfig.from_dict(state["config"])


class MetricsLog:
    """`metrics.jsonl`, one JSON object per logged iteration."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / METRICS

    def truncate_after(self, step: int) -> None:
        """Drop lines past `step`: those iterations are recomputed after a resume."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["iter"] <= step]
        atomic.write_bytes(self.path, "".join(f"{line}\n" for line in keep).encode())

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
