"""Run directories: config, checkpoint, metrics log and results, all written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from fastres import atomic
from fastres.config import RunConfig
from fastres.errors import RunError
from fastres.weights import CHECKPOINT, load_file

CONFIG = "config.json"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
LOCK = ".lock"
PREVIOUS = "checkpoint.prev.pt"  # a fused run's checkpoint before its latest (see fastres.group)
GROUP = "group.json"  # a fused run's group: its runs' directories, relative to its own
# What a checkpoint holds. 0: before it had a version; 1: adds "normalization" (mean, std).
FORMAT = 1


def refuse_overwrite(out: str, resuming: bool) -> None:
    """A new run never writes into a directory that holds another run's checkpoint."""
    if not resuming and any((Path(out) / name).exists() for name in (CHECKPOINT, PREVIOUS)):
        raise RunError(f"{out} already holds a run: pass --resume {out}, or choose another --out")


def prepare_run_dir(out: str, resuming: bool) -> Path:
    """Create the run directory and prove it writable; if it is not, remove the folders
    this call made, so a refused run leaves no trace. A new run in a directory left by a
    run killed before its first checkpoint starts clean (its stale metrics are removed,
    with a note), never appending to them."""
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
    stale = [path / name for name in (METRICS, RESULTS, CONFIG) if (path / name).exists()]
    if not resuming and stale:
        for file in stale:
            file.unlink()
        print(f"fastres: note: {path} held a run stopped before its first checkpoint: starting it again from "
              "iteration 0", file=sys.stderr)
    return path


class RunLock:
    """One process per run directory: a lock file naming the owner's host and pid. A second
    process is refused in one line; a lock left by a dead process on this host (kill -9) is
    taken over, with a note. Disabled (a no-op) on the ranks that do not write."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path, self.enabled = run_dir / LOCK, enabled
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}

    def __enter__(self) -> RunLock:
        if self.enabled:
            self._acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled and self._owner() == self.me:
            self.path.unlink(missing_ok=True)

    def _owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # gone, or cut short by a kill while it was written
        return owner if isinstance(owner, dict) and {"host", "pid"} <= owner.keys() else None

    def _acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and (owner["host"] != self.me["host"] or _alive(owner["pid"])):
                    raise RunError(f"{self.path.parent} is in use by pid {owner['pid']} on {owner['host']}; "
                                   f"wait for it to finish (or, if it is gone, remove {self.path})") from None
                who = f"pid {owner['pid']}, no longer running" if owner else "an unreadable lock"
                print(f"fastres: note: taking over {self.path} from {who}", file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            return
        raise RunError(f"{self.path}: could not take the lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def checkpoint_path(path: str | Path) -> Path:
    """The checkpoint file of a run directory, or the file itself."""
    path = Path(path)
    ckpt = path / CHECKPOINT if path.is_dir() else path
    if not ckpt.is_file():
        raise RunError(f"{path}: no checkpoint ({CHECKPOINT}) to resume or evaluate")
    return ckpt


def save(run_dir: Path, state: dict[str, Any], keep_previous: bool = False) -> None:
    """Write the checkpoint atomically. `keep_previous` (runs of a fused group): the current
    one becomes checkpoint.prev.pt first, so a kill between the group's writes leaves a
    step every run holds. A lone run keeps no previous checkpoint (an old one is removed)."""
    current, previous = run_dir / CHECKPOINT, run_dir / PREVIOUS
    try:
        if keep_previous and current.exists():
            os.replace(current, previous)
        elif not keep_previous:
            previous.unlink(missing_ok=True)
    except OSError as e:
        raise RunError(f"cannot keep the previous checkpoint in {run_dir} ({e.strerror or e})") from None
    atomic.torch_save(current, {"format": FORMAT, **state})


def saved_files(run_dir: Path) -> list[Path]:
    """A run directory's checkpoint files, current first, then the previous one."""
    return [f for f in (run_dir / CHECKPOINT, run_dir / PREVIOUS) if f.is_file()]


def read_json(path: Path) -> Any:
    """A run directory's JSON file (config.json, group.json); the caller words its errors."""
    return json.loads(path.read_text())


def load(path: str | Path) -> dict[str, Any]:
    ckpt = checkpoint_path(path)
    state = load_file(ckpt, "checkpoint")
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise RunError(f"{ckpt}: not a fastres checkpoint")
    if state.get("format", 0) > FORMAT:
        raise RunError(f"{ckpt}: written by a newer fastres (checkpoint format {state['format']}; this one reads "
                       f"formats up to {FORMAT}): update fastres")
    return state


def config_of(state: dict[str, Any]) -> RunConfig:
    return RunConfig.from_dict(state["config"])


class MetricsLog:
    """`metrics.jsonl`, one JSON object per logged iteration. A kill during an append can
    leave a partial last line: reading skips it, and a resume rewrites the file without it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / METRICS

    def _records(self) -> list[tuple[str, dict[str, Any]]]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                records.append((line, json.loads(line)))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: its iteration is recomputed
        return records

    def truncate_after(self, step: int) -> None:
        """Keep the whole lines up to `step`: later iterations are recomputed after a resume."""
        if self.path.exists():
            keep = [line for line, record in self._records() if record.get("iter", 0) <= step]
            atomic.write_bytes(self.path, "".join(f"{line}\n" for line in keep).encode())

    def append(self, record: dict[str, Any]) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise RunError(f"cannot write {self.path} ({e.strerror or e})") from None

    def read(self) -> list[dict[str, Any]]:
        return [record for _, record in self._records()]
