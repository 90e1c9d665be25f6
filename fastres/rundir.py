"""A run directory, owned by this module alone: its lock, config, metrics log, checkpoints,
results and group file, and the point a run resumes from.

What fastres writes into a run directory, and nothing else:

    config.json         the run's config (RunConfig), written when it starts
    metrics.jsonl       one JSON record per logged iteration, appended
    checkpoint.pt       the latest checkpoint (fastres.checkpoint), replaced atomically
    checkpoint.prev.pt  the one before it, kept by the runs of a fused group
    group.json          a fused run's group: its runs' directories, relative to its own
    results.json        the final results, once the run has finished
    .fastres.lock       held (flock) by the one process that writes the directory

Rules: the lock is taken before anything in the directory is read to decide or written; a
new run refuses a directory that holds anything but its own files of a run stopped before
its first checkpoint (and removes only those, saying so); a finished run is never redone; a
run whose results were lost after its final checkpoint gets them back on `--resume`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shlex
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fastres import atomic, checkpoint
from fastres.checkpoint import Checkpoint
from fastres.config import ROLES, RunConfig, is_int, is_number
from fastres.errors import RunError, UsageError

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
LOCK = ".fastres.lock"
PREVIOUS = "checkpoint.prev.pt"
GROUP = "group.json"
# A run stopped before its first checkpoint leaves these (and its lock, and atomic writes'
# temporary files): a new run may remove them. Anything else in the directory is not its own.
RESTARTABLE = (CONFIG, METRICS, GROUP)
OWN = (CONFIG, METRICS, RESULTS, CHECKPOINT, PREVIOUS, GROUP)
TEMPORARY = re.compile(rf"\.({'|'.join(map(re.escape, OWN))})\.[A-Za-z0-9_]+\.tmp")  # atomic's, left by a kill


class RunLock:
    """One writer per run directory: an exclusive `flock` on `.fastres.lock`, released by the kernel
    when its process ends however it ends, so a lock can neither be held twice nor outlive
    a kill -9. The file names its holder (host, pid) for the message a second process gets;
    the name is information, the flock is the lock."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        for _ in range(3):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                owner = _owner(fd)
                os.close(fd)
                if not isinstance(e, BlockingIOError):  # a filesystem without flock (some NFS, Lustre)
                    raise RunError(f"cannot lock {self.path} ({e.strerror}): this filesystem does not support "
                                   "file locks; choose an --out on one that does") from None
                who = f"pid {owner['pid']} on {owner['host']}" if owner else "another process"
                raise RunError(f"{self.path.parent} is in use by {who}; wait for it to finish, or pass another "
                               "--out") from None
            if not _same_file(fd, self.path):  # its holder removed it as we opened it: take the new one
                os.close(fd)
                continue
            self._check_stale(fd)
            self._write_owner(fd)
            self.fd = fd
            return self
        raise RunError(f"{self.path}: could not take the lock")

    def _check_stale(self, fd: int) -> None:
        """What an unheld lock file says: nothing (new), a holder on this host that is gone
        (taken over, with a note), or something fastres did not write, or a holder on
        another host, which a lock that is not shared between hosts cannot rule out: both
        refused, the file left as it is."""
        stale, size = _owner(fd), os.fstat(fd).st_size
        if stale is None and size == 0 or stale == self.me:
            return
        if stale is None or stale["host"] != self.me["host"]:
            os.close(fd)
            what = "is not a fastres lock" if stale is None else f"names pid {stale['pid']} on {stale['host']}"
            raise RunError(f"{self.path} {what}: if no run is using {self.path.parent}, remove the file")
        print(f"fastres: note: taking over {self.path} from pid {stale['pid']}, no longer running", file=sys.stderr)

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise RunError(f"cannot write to run directory {self.path.parent} ({e.strerror})") from None

    def _write_owner(self, fd: int) -> None:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self.me).encode(), 0)
        except OSError as e:  # a full disk: no half-written lock left behind
            self.path.unlink(missing_ok=True)
            os.close(fd)
            raise RunError(f"cannot write {self.path} ({e.strerror})") from None

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # still held: nobody else can be between our unlink and close
            os.close(self.fd)
            self.fd = None


def _owner(fd: int) -> dict[str, Any] | None:
    try:
        owner = json.loads(os.pread(fd, 4096, 0))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and {"host", "pid"} <= owner.keys() else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


class MetricsLog:
    """`metrics.jsonl`, one JSON object per logged iteration. A kill during an append can
    leave a partial last line: reading skips it, and a resume rewrites the file without it.
    A whole line that is not a record (hand-edited) is one line naming the file and line."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / METRICS

    def _records(self) -> list[tuple[str, dict[str, Any]]]:
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        except OSError as e:
            raise RunError(f"cannot read {self.path} ({e.strerror})") from None
        records = []
        lines = text.splitlines()
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines) and not text.endswith("\n"):
                    continue  # a line cut short by a kill: its iteration is recomputed
                raise RunError(f"{self.path}, line {number}: not JSON; fastres wrote one record a line") from None
            if not _is_record(record):
                raise RunError(f"{self.path}, line {number}: not a metrics record (an object with a positive "
                               "integer 'iter' and numbers)")
            records.append((line, record))
        return records

    def truncate_after(self, step: int) -> None:
        """Keep the whole lines up to `step`: later iterations are recomputed after a resume."""
        if self.path.exists():
            keep = [line for line, record in self._records() if record["iter"] <= step]
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


def _is_record(record: Any) -> bool:
    """A metrics record: a positive integer `iter`, numbers (or null), and a divergence's message."""
    return (isinstance(record, dict) and is_int(record.get("iter")) and record["iter"] > 0
            and all(v is None or is_number(v) or (k == "diverged" and isinstance(v, str)) for k, v in record.items()))


# What the report and the reproduction read from results.json (the rest is information).
RESULT_FIELDS: dict[str, tuple[Any, str]] = {
    "model": (lambda v: isinstance(v, str), "a model name"),
    "shortcut": (lambda v: v is None or isinstance(v, str), "a shortcut option or null"),
    "test_error": (lambda v: is_number(v) and 0 <= v <= 1, "an error rate in [0, 1]"),
    "params": (lambda v: is_int(v) and v > 0, "a parameter count"),
    "wall_time_s": (lambda v: is_number(v) and v >= 0, "seconds"),
    "device": (lambda v: isinstance(v, str), "a device name"),
    "config": (lambda v: isinstance(v, dict), "the run's config"),
}


class RunDir:
    """The files of one run directory, read and written only here."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.metrics = MetricsLog(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def lock(self) -> RunLock:
        return RunLock(self.path)

    # config
    def write_config(self, cfg: RunConfig) -> None:
        atomic.write_json(self.path / CONFIG, cfg.to_dict())

    def config(self) -> RunConfig:
        """The run's config: its checkpoint's, else config.json's (a run stopped before its
        first checkpoint)."""
        saved = self.checkpoints()
        if saved:
            return saved[0].config
        return checkpoint.read_config(self._json(CONFIG, "config"), self.path / CONFIG)

    # checkpoints
    def save(self, ckpt: Checkpoint, keep_previous: bool = False) -> None:
        """Write the checkpoint atomically. `keep_previous` (runs of a fused group): the
        current one becomes checkpoint.prev.pt first, so a kill between the group's writes
        leaves a step every run holds. A lone run keeps no previous checkpoint."""
        current, previous = self.path / CHECKPOINT, self.path / PREVIOUS
        try:
            if keep_previous and current.exists():
                os.replace(current, previous)
            elif not keep_previous:
                previous.unlink(missing_ok=True)
        except OSError as e:
            raise RunError(f"cannot keep the previous checkpoint in {self.path} ({e.strerror or e})") from None
        checkpoint.write(current, ckpt)

    def checkpoint_files(self) -> list[Path]:
        return [f for f in (self.path / CHECKPOINT, self.path / PREVIOUS) if f.is_file()]

    def checkpoints(self) -> list[Checkpoint]:
        """The run's checkpoints, current first, then the previous one; each validated."""
        return [checkpoint.read(f) for f in self.checkpoint_files()]

    def checkpoint(self) -> Checkpoint:
        return checkpoint.read(checkpoint_file(self.path))

    # results
    def write_results(self, results: dict[str, Any]) -> None:
        atomic.write_json(self.path / RESULTS, results)

    def results(self) -> dict[str, Any] | None:
        """The final results, None before the run has finished; a file that is not what
        fastres wrote is one line."""
        if not (self.path / RESULTS).is_file():
            return None
        file = self.path / RESULTS
        results = self._json(RESULTS, "results")
        if not isinstance(results, dict):
            raise RunError(f"{file}: not a fastres results file (an object)")
        for name, (ok, what) in RESULT_FIELDS.items():
            if not ok(results.get(name)):
                raise RunError(f"{file}: field {name!r} should be {what}, got {results.get(name)!r:.40}")
        checkpoint.read_config(results["config"], file)
        return results

    # group
    def write_group(self, outs: Sequence[str], sweep: dict[str, Any] | None = None) -> None:
        """Name a run's group (paths relative to it, so a folder of runs can be moved as a
        whole), and the sweep it is part of, if any; a run trained alone has no group file."""
        if len(outs) > 1:
            group = {"runs": [os.path.relpath(out, self.path) for out in outs]}
            atomic.write_json(self.path / GROUP, {**group, "sweep": sweep} if sweep else group)
        else:
            (self.path / GROUP).unlink(missing_ok=True)

    def group(self) -> list[Path]:
        """The run directories this run was last trained with (itself alone if not fused)."""
        if not (self.path / GROUP).is_file():
            return [self.path]
        runs = self._json(GROUP, "group")
        if not (isinstance(runs, dict) and isinstance(runs.get("runs"), list)
                and all(isinstance(r, str) for r in runs["runs"]) and runs["runs"]):
            raise RunError(f"{self.path / GROUP}: not a fastres group file (a list of run directories)")
        return [Path(os.path.normpath(self.path / rel)) for rel in runs["runs"]]

    def diverged(self) -> bool:
        """Whether the run stopped on divergence (its metrics end with the record that says so)."""
        records = self.metrics.read()
        return bool(records) and "diverged" in records[-1]

    def _json(self, name: str, what: str) -> Any:
        try:
            return json.loads((self.path / name).read_text())
        except FileNotFoundError:
            raise RunError(f"{self.path}: not a run directory (no {CHECKPOINT}, no {name})") from None
        except (OSError, ValueError) as e:
            raise RunError(f"{self.path / name}: unreadable {what} ({e})") from None

    # a new run's claim
    def refuse_unless_new(self) -> list[Path]:
        """Refuse a directory that is not free for a new run; return its files of a run
        stopped before its first checkpoint, which a new run replaces. Read-only."""
        if not self.path.exists():
            return []
        if not self.path.is_dir():
            raise RunError(f"--out {self.path} is a file, not a folder")
        names = sorted(os.listdir(self.path))
        if RESULTS in names:
            raise RunError(f"{self.path} holds a finished run ({RESULTS}): fastres never redoes or clears one; "
                           "choose another --out")
        if CHECKPOINT in names or PREVIOUS in names:
            raise RunError(f"{self.path} already holds a run: pass --resume {shlex.quote(str(self.path))}, or choose "
                           "another --out")
        foreign = [n for n in names if n not in (*RESTARTABLE, LOCK) and not TEMPORARY.fullmatch(n)]
        if not foreign and any(n in names for n in RESTARTABLE):
            try:
                checkpoint.read_config(self._json(CONFIG, "config"), self.path / CONFIG)
            except RunError:  # no config that fastres wrote beside them: maybe the user's files
                foreign = [n for n in names if n in RESTARTABLE]
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise RunError(f"{self.path} holds files that are not a fastres run's ({shown}); fastres removes only "
                           "what it wrote: choose another --out, or --resume it if it is a run")
        return [self.path / n for n in names if n in RESTARTABLE or TEMPORARY.fullmatch(n)]

    def clear(self, files: Sequence[Path], why: str) -> None:
        """Remove this run's own files of a run stopped before its first checkpoint, saying which."""
        if files:
            for file in files:
                file.unlink(missing_ok=True)
            print(f"fastres: note: {self.path} held a run {why}: removed its {', '.join(f.name for f in files)}; "
                  "starting it again from iteration 0", file=sys.stderr)


def is_own_name(path: Path) -> bool:
    """Whether a path another command would write is named (or links to) one of a run
    directory's own files, which only this module writes."""
    return bool({path.name, path.resolve().name} & set(OWN))


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint of a run directory, or the file itself: where "a run directory or a
    checkpoint" is resolved, for training, evaluation and export alike."""
    path = Path(path)
    ckpt = path / CHECKPOINT if path.is_dir() else path
    if not ckpt.is_file():
        raise RunError(f"{path}: no checkpoint ({CHECKPOINT}) to resume or evaluate")
    return ckpt


def read_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint of a run directory or a checkpoint file, validated."""
    return checkpoint.read(checkpoint_file(path))


@contextlib.contextmanager
def new_runs(paths: Sequence[str], enabled: bool = True) -> Iterator[list[RunDir]]:
    """Create and lock the directories of new runs, then check each again under its lock
    and remove its own files of a run stopped before its first checkpoint. A refusal
    removes the folders this call made. `enabled` False (the ranks that do not write):
    the directories, untouched."""
    dirs = [RunDir(p) for p in paths]
    if not enabled:
        yield dirs
        return
    made: list[Path] = []
    try:
        with contextlib.ExitStack() as locks:
            for d in dirs:
                made += [p for p in (d.path, *d.path.parents) if not p.exists()][::-1]
                _mkdir(d.path)
                locks.enter_context(d.lock())
                d.clear(d.refuse_unless_new(), "stopped before its first checkpoint")
            made = []
            yield dirs
    finally:
        for folder in reversed(made):  # deepest first; only if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot write to run directory {path} ({e.strerror})") from None


@dataclasses.dataclass
class Saved:
    """What one run directory holds: its config and its checkpoints, newest first."""

    dir: RunDir
    config: RunConfig
    states: list[Checkpoint]

    @property
    def path(self) -> Path:
        return self.dir.path

    @property
    def steps(self) -> set[int]:
        """Steps this run can resume from; 0 (a fresh start) while it has been saved once at most."""
        steps = {state.step for state in self.states}
        return steps | {0} if len(self.states) < 2 else steps

    def at(self, step: int) -> Checkpoint | None:
        """The checkpoint at `step`; None for a fresh start."""
        return next((s for s in self.states if s.step == step), None)


def read(d: RunDir) -> Saved:
    """A run directory's config and checkpoints (current, then previous). A finished run
    whose checkpoint is gone is never redone; a config.json that no longer says what the
    checkpoint's config says (hand-edited) is refused rather than silently replaced."""
    states = d.checkpoints()
    if not states and (d.path / RESULTS).is_file():
        raise RunError(f"{d.path} holds a finished run ({RESULTS}) whose checkpoint is gone: fastres never redoes "
                       "or clears one; train it again into another --out")
    if not states:
        return Saved(d, d.config(), states)
    saved = states[0].config
    if (d.path / CONFIG).is_file():
        written = checkpoint.read_config(d._json(CONFIG, "config"), d.path / CONFIG)
        differ = [k for k in fixed_on_resume() if k not in ("out", "data") and getattr(written, k) != getattr(saved, k)]
        if differ:
            raise RunError(f"{d.path / CONFIG} differs from the config its checkpoint was saved with "
                           f"({', '.join(differ)}): a run resumes with the config it was trained with; put "
                           "config.json back as it was")
    return Saved(d, saved, states)


def fixed_on_resume() -> list[str]:
    """The config fields a resume keeps as saved (the rest may be given again, or are found)."""
    return [name for name, role in ROLES.items() if role.on_resume == "fixed"]


@dataclasses.dataclass
class ResumePoint:
    """The runs to resume together (locked) and the latest step that every one of them holds."""

    saved: list[Saved]
    step: int

    @property
    def states(self) -> list[Checkpoint] | None:
        """The runs' checkpoints at the step; None at step 0, a fresh start."""
        return [s.at(self.step) for s in self.saved] if self.step else None

    def clear_for_restart(self) -> None:
        """A group stopped before its first checkpoints were all written starts again: remove
        what its runs wrote (checkpoints included), saying so."""
        for s in self.saved:
            saved = s.dir.checkpoint_files()
            why = "whose first checkpoints were not all written" if saved else "stopped before its first checkpoint"
            s.dir.clear([*saved, *(s.path / n for n in RESTARTABLE if (s.path / n).exists())], why)


    def clear_temporary(self) -> None:
        """Atomic writes' temporary files that a kill left in the runs' directories (fastres' own)."""
        for s in self.saved:
            for name in os.listdir(s.path):
                if TEMPORARY.fullmatch(name):
                    (s.path / name).unlink(missing_ok=True)

    def leave_group(self) -> None:
        """The runs go on alone (`--fuse off`): each becomes a single run, its group file removed."""
        for s in self.saved:
            s.dir.write_group([str(s.path)])


@contextlib.contextmanager
def resuming(dirs: Sequence[str | Path], enabled: bool = True) -> Iterator[ResumePoint]:
    """Lock the runs to resume, then read where they resume from. One directory resumes
    the whole group its group.json names (less any run that diverged or has finished);
    several must be runs of one group. `enabled` False (the ranks that do not write): read without locks."""
    with contextlib.ExitStack() as locks:
        first = RunDir(dirs[0])
        if not (first.checkpoint_files() or (first.path / CONFIG).is_file()):  # before a lock file is made there
            raise RunError(f"{first.path}: not a run directory (no {CHECKPOINT}, no {CONFIG}) to resume")
        if enabled:
            locks.enter_context(first.lock())
        names = [first.path, *map(Path, dirs[1:])]
        group = first.group() if len(dirs) == 1 else []
        if len(group) > 1:
            names = [p for p in group if not RunDir(p).diverged()]  # a diverged run left its group
            if not names:
                raise RunError(f"every run of {dirs[0]}'s group diverged: start them again with a lower --lr "
                               "(or a --warmup-iters)")
            going = [p for p in names if not (p / RESULTS).is_file()]  # so did one that ended first (a sweep's)
            names = going or [first.path]
            print(f"fastres: {dirs[0]} was trained fused: resuming its group ({', '.join(map(str, names))})",
                  file=sys.stderr)
        runs = [first if os.path.normpath(p) == os.path.normpath(first.path) else RunDir(p) for p in names]
        for d in runs:
            if enabled and d is not first:
                locks.enter_context(d.lock())
        saved = [read(d) for d in runs]
        yield ResumePoint(saved, _common_step(saved))


def _common_step(saved: list[Saved]) -> int:
    names = {Path(os.path.normpath(s.path)) for s in saved}
    for s in saved:
        group = s.dir.group()
        if not names <= set(group):
            raise UsageError(f"{s.path} was trained in a group of {len(group)} ({', '.join(map(str, group))}), "
                             f"not with {', '.join(str(o.path) for o in saved if o is not s)}: resume one group at a "
                             "time")
    common = set.intersection(*(s.steps for s in saved))
    if not common:
        held = "; ".join(f"{s.path}: {sorted(s.steps)}" for s in saved)
        raise RunError(f"the runs hold no checkpoint step in common, so they cannot resume as a group ({held})")
    return max(common)
