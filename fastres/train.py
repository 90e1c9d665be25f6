"""Train a CIFAR-10 ResNet with the paper's recipe: `python -m fastres.train resnet56 --amp`.

One flat loop, top to bottom. The learning rate is a pure function of the iteration; the
loader position is a pure function of the iteration too, so a checkpoint holds all the
state a run needs and a resumed run continues bit for bit (on CPU).

The loop trains a group of runs alike but for their seed (`--seeds`, fused into one step
by `fastres.fused`); a single run is a group of one, through the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastres import distributed, fused, group, progress, rundir, schedule
from fastres.checkpoint import Checkpoint, Normalization
from fastres.cli import run_main
from fastres.config import SWEEPS, RunConfig, build_parser, configs_from_args, parse_spec, resume_overrides, validate
from fastres.data import loaders
from fastres.data.dataset import DATASETS
from fastres.errors import RunError, UsageError
from fastres.metrics import Sums, Window
from fastres.models import count_parameters
from fastres.progress import Reporter, summary
from fastres.rundir import RunDir
from fastres.runtime import (
    PRECISIONS,
    configure_backends,
    device_name,
    git_commit,
    memory_bytes,
    param_dtype,
    pick_device,
    requested_precision,
    resolve_precision,
    tensor_dtype,
    versions,
)
from fastres.step import TrainStep


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps, checkpoints, and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __enter__(self) -> StopFlag:
        self._old = {s: signal.signal(s, self._set) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _set(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


class Clock:
    """Training time (evaluation and checkpoints excluded) and wall time, both carried
    across resumes; `lap_window` gives the steps and training seconds since the last
    metrics read, both counted by this process (after a resume: since it started)."""

    now = staticmethod(time.perf_counter)

    def __init__(self, train_time: float = 0.0, wall_time: float = 0.0) -> None:
        self.train_time, self._wall0, self._start = train_time, wall_time, self.now()
        self._mark, self._window, self._running, self._steps = self._start, 0.0, True, 0

    def tick(self) -> None:
        """One training step done."""
        self._steps += 1

    def _lap(self) -> None:
        now = self.now()
        if self._running:
            self.train_time += now - self._mark
            self._window += now - self._mark
        self._mark = now

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, checkpoints) is not training time."""
        self._lap()
        self._running = False
        try:
            yield
        finally:
            self._lap()
            self._running = True

    def lap_window(self) -> tuple[int, float]:
        self._lap()
        steps, seconds, self._steps, self._window = self._steps, self._window, 0, 0.0
        return steps, seconds

    def wall(self) -> float:
        return self._wall0 + self.now() - self._start


@dataclass
class Session:
    """Everything a group of runs trains with (one run, unless fused), built from their
    configs before anything is written."""

    cfgs: list[RunConfig]  # one per run, alike but for seed, hyperparameters and run directory
    dist: distributed.DistInfo
    device: torch.device
    model: nn.Module  # the runs' models fused into one (`fastres.fused`); one run's is its own model
    step: TrainStep
    data: loaders.Data
    prepared: loaders.Prepared
    notes: list[str]  # what the precision and thread count say, once each

    @property
    def cfg(self) -> RunConfig:
        """What the runs share (model, batch size, data...): the first run's config."""
        return self.cfgs[0]

    @property
    def runs(self) -> int:
        return len(self.cfgs)

    @property
    def iters(self) -> int:
        """Where the group stops: its longest run's end (the others leave it at theirs)."""
        return max(c.iters for c in self.cfgs)

    @property
    def swept(self) -> list[str]:
        """The sweep keys whose values differ among the group's runs."""
        return [k for k, sw in SWEEPS.items() if len({getattr(c, sw.field) for c in self.cfgs}) > 1]

    @property
    def labels(self) -> list[str]:
        """How the display names each run: its seed, and the values it differs in from the
        others of its sweep (`lr0.05 s0`)."""
        if self.runs == 1:
            return [f"s{self.cfg.seed}"]
        keys = self.swept
        return [" ".join([*(SWEEPS[k].token(k, getattr(c, SWEEPS[k].field)) for k in keys), f"s{c.seed}"])
                for c in self.cfgs]


def setup(cfgs: list[RunConfig], dist: distributed.DistInfo, prepared: loaders.Prepared | None = None) -> Session:
    """Device, precision, data, models and step. Every error found here (runs that cannot be
    fused, bad batch size, bad data) comes before any run directory is claimed, so it leaves
    no trace on disk. Run k's model is initialised from its own seed, as it would be alone.
    `prepared`: data already read (a group that goes on without a diverged run)."""
    cfg = cfgs[0]
    device = pick_device(cfg.device) if dist.world_size == 1 else dist.device
    if cfg.batch_size % dist.world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} does not split over {dist.world_size} processes")
    configure_backends(device, cfg.deterministic)
    precision, note = resolve_precision(device, cfg.precision or requested_precision(cfg.amp, cfg.amp_dtype))
    notes = [note] if note else []
    threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.cpu_threads not in (None, threads):
        notes.append(
            f"note: this run was trained with {cfg.cpu_threads} CPU threads and goes on with {threads}: it continues "
            "from its checkpoint, but no longer bit for bit as the unbroken run (the thread count orders the CPU's "
            f"sums; OMP_NUM_THREADS={cfg.cpu_threads} restores it)")
    cfgs = [dataclasses.replace(c, precision=precision, cpu_threads=c.cpu_threads or threads) for c in cfgs]
    dtype = PRECISIONS[precision]
    num_classes = DATASETS[cfg.dataset].num_classes
    cfg.spec.check_fits(memory_bytes(device), num_classes, cfg.batch_size // dist.world_size, len(cfgs),
                        tensor_dtype(precision).itemsize)  # before any data is read or anything is built
    prepared = prepared or loaders.prepare(cfg.data, cfg.val_split, cfg.val_seed, cfg.normalize, dataset=cfg.dataset,
                                           progress=progress.resolve(cfg.progress) if dist.is_main else "none")
    where = loaders.Placement(device, tensor_dtype(precision), cfg.channels_last, dist.rank, dist.world_size)
    seeds = [c.seed for c in cfgs]
    data = loaders.build(prepared, where, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
                         seed=seeds[0] if len(seeds) == 1 else seeds, loader=cfg.loader)
    members = []
    for seed in seeds:
        torch.manual_seed(seed)
        members.append(cfg.spec.build(num_classes))
    model = fused.fuse(members).to(device, param_dtype(precision))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step = TrainStep(distributed.wrap(model, dist), device, dtype, cfg.compile,
                     hyper=[(c.momentum, c.weight_decay) for c in cfgs], runs=len(cfgs))
    return Session(cfgs, dist, device, model, step, data, prepared, notes)


def train(cfg: RunConfig, stop_at: int | None = None, deadline: float | None = None) -> dict[str, Any] | None:
    """Train one new run. Returns its results, or None when stopped early by a signal, by
    `stop_at` (an iteration) or by `deadline` (a `time.monotonic()` instant): the same path
    for all three, checkpoint, then return."""
    results = train_group([cfg], stop_at, deadline)
    return None if results is None else results[0]


def train_group(cfgs: list[RunConfig], stop_at: int | None = None,
                deadline: float | None = None) -> list[dict[str, Any]] | None:
    """Train new runs alike but for their seed as one fused group (or one run): each writes
    its own run directory in a single run's format. A directory that is not free for a new
    run is refused before anything is built, and again under its lock."""
    group.check(cfgs, int(os.environ.get("WORLD_SIZE", "1")))  # before joining any process group
    for cfg in cfgs:
        RunDir(cfg.out).refuse_unless_new()
    return _run(cfgs, None, lambda writes: rundir.new_runs([c.out for c in cfgs], writes), stop_at, deadline)


def resume(dirs: list[str], overrides: dict[str, Any] | None = None,
           check: Callable[[list[RunConfig], int], None] | None = None, alone: bool = False, stop_at: int | None = None,
           deadline: float | None = None) -> list[dict[str, Any]] | None:
    """Continue runs where they stopped, under their locks, taken before anything is read:
    a run (or a fused run's whole group) from the latest step all its runs hold; from
    iteration 0 if that is none; and a finished run whose results were lost gets them back
    from its final checkpoint. `overrides`: options that change no result (device,
    progress); `check`: the caller's test of the saved configs and the step they resume
    from; `alone`: a group's runs go on one after another, each a single run from then on
    (`--fuse off`). Nothing in the directories changes before everything is built."""
    writes = int(os.environ.get("RANK", "0")) == 0
    with rundir.resuming(dirs, enabled=writes) as point:
        cfgs = [validate(dataclasses.replace(s.config, out=str(s.path), **(overrides or {}))) for s in point.saved]
        if check is not None:
            check(cfgs, point.step)
        ended = [k for k, c in enumerate(cfgs) if point.step >= c.iters]  # a sweep's run may end before the others
        results = finished([cfgs[k] for k in ended], [point.saved[k] for k in ended], writes) if ended else []
        if len(ended) == len(cfgs):
            return results
        if ended:
            going = [k for k in range(len(cfgs)) if k not in ended]
            cfgs, point = [cfgs[k] for k in going], rundir.ResumePoint([point.saved[k] for k in going], point.step)
        if not alone:
            group.check(cfgs, int(os.environ.get("WORLD_SIZE", "1")))
        changes = [point.clear_temporary] + ([point.clear_for_restart] if point.step == 0 else [])
        if alone and len(cfgs) > 1:
            changes.append(point.leave_group)

        def claim(writing: bool, part: list[int]) -> contextlib.AbstractContextManager[list[RunDir]]:
            """Called once the part's data and model are built: the directories change only now."""
            while writing and changes:
                changes.pop(0)()
            return contextlib.nullcontext([point.saved[k].dir for k in part])

        for part in [[k] for k in range(len(cfgs))] if alone else [list(range(len(cfgs)))]:
            states = None if point.states is None else [point.states[k] for k in part]
            done = _run([cfgs[k] for k in part], states, lambda w, part=part: claim(w, part), stop_at, deadline)
            if done is None:
                return None
            results += done
        return results


def finished(cfgs: list[RunConfig], saved: list[rundir.Saved], writes: bool) -> list[dict[str, Any]]:
    """The results of runs whose final checkpoint is written; those whose results.json a
    kill took are written again from it."""
    lost = [k for k, s in enumerate(saved) if s.dir.results() is None]
    if not lost:
        for c in cfgs:
            print(f"fastres: {c.out}: already finished {c.iters} iterations; nothing to do")
        return [s.dir.results() or {} for s in saved]
    dist = distributed.setup()
    try:
        for k in lost:
            run = saved[k]
            s = setup([cfgs[k]], dist)
            files = Files([run.dir], writes)
            window = Window(s.device, s.cfg.batch_size)
            done, clock = restore(s, [run.states[0]], window)
            logged = [r for r in run.dir.metrics.read() if r["iter"] == done]
            evals = [f"{name}_error" for name in s.data.evals]
            final = logged[0] if logged and all(e in logged[0] for e in evals) else {}
            if not final:  # not saved: the final evaluation is redone from the final checkpoint
                final = read_metrics(s, window, clock, logged=False, evaluated=True)[0]
            print(f"fastres: {run.path}: results.json was lost after the final checkpoint: writing it again",
                  file=sys.stderr)
            reporter = Reporter(s.cfg.progress if writes else "none", done, done, s.cfg.model)
            group_of = [str(p) for p in run.dir.group()]
            finish(s, 0, files, final, clock, reporter, group_of if len(group_of) > 1 else None)
    finally:
        distributed.teardown(dist)
    return [s.dir.results() or {} for s in saved]


Claim = Callable[[bool], contextlib.AbstractContextManager[list[RunDir]]]


def _run(cfgs: list[RunConfig], states: list[Checkpoint] | None, claim: Claim, stop_at: int | None,
         deadline: float | None) -> list[dict[str, Any]] | None:
    """Join the process group, build everything, claim the run directories (only now: an
    error found while building leaves no trace on disk), train. A run that diverges is
    stopped and reported, and the others go on; the error for it is raised once they have
    finished. A run of a sweep that ends before the others leaves the group the same way,
    its results written. Returns the finished runs' results, None when stopped early."""
    dist = distributed.setup()
    failed: list[str] = []
    results: list[dict[str, Any]] | None = []
    saved = None if states is None else states[0].step
    try:
        s = setup(cfgs, dist)
        with claimed(claim, dist) as dirs:
            files = Files(dirs, dist.is_main)
            while True:
                outcome = _train(s, files, states, stop_at, deadline, saved)
                failed += outcome.diverged
                results = None if outcome.results is None else results + outcome.results
                if results is None or outcome.go_on is None or not outcome.go_on[0]:
                    break
                live, states, saved = outcome.go_on  # the runs that did not diverge or end go on as a smaller group
                files, s = files.only(live), setup([s.cfgs[k] for k in live], dist, s.prepared)
    finally:
        distributed.teardown(dist)
    if failed:
        others = f"; the other {len(results)} run(s) of its group finished" if results else ""
        raise RunError(f"{failed[0]}{others}" + (f" ({len(failed) - 1} more diverged)" if len(failed) > 1 else ""))
    return results


@contextlib.contextmanager
def claimed(claim: Claim, dist: distributed.DistInfo) -> Iterator[list[RunDir]]:
    """The run directories, claimed on rank 0 (the one that writes); every process learns
    whether that worked before any trains, so a refusal (a lock held elsewhere) ends them
    all in one line each instead of leaving the others in their first collective."""
    with contextlib.ExitStack() as stack:
        refused: Exception | None = None
        try:
            dirs = stack.enter_context(claim(dist.is_main))
        except (RunError, UsageError) as e:
            refused = e
        if distributed.any_rank(refused is not None, dist):
            raise refused or RunError("rank 0 of this torchrun job could not claim the run directory (its error "
                                      "says why)")
        yield dirs


class Files:
    """What the training loop's events write, each into its run's directory (on rank 0;
    the other ranks write nothing): the loop itself opens no path."""

    def __init__(self, dirs: list[RunDir], writes: bool) -> None:
        self.dirs, self.writes = dirs, writes

    def only(self, live: list[int]) -> Files:
        return Files([self.dirs[k] for k in live], self.writes)

    def begin(self, cfgs: list[RunConfig], start: int) -> None:
        """The configs and group files; past a resume point, the logged iterations go (they
        are recomputed)."""
        if self.writes:
            for cfg, d in zip(cfgs, self.dirs, strict=True):
                if start:
                    d.metrics.truncate_after(start)
                d.write_config(cfg)
                d.write_group([c.out for c in cfgs], cfg.extra.get("sweep"))

    def log(self, k: int, record: dict[str, Any]) -> None:
        if self.writes:
            self.dirs[k].metrics.append(record)

    def save(self, live: list[int], states: list[Checkpoint]) -> None:
        """The live runs' checkpoints, one after another; runs of a group keep their previous
        checkpoint, so a kill between two writes leaves a step every run holds."""
        if self.writes:
            for k, state in zip(live, states, strict=True):
                self.dirs[k].save(state, keep_previous=len(self.dirs) > 1)

    def results(self, k: int, results: dict[str, Any]) -> Path | None:
        """The results of a finished run; its previous checkpoint (a group's) is no longer needed."""
        if self.writes:
            self.dirs[k].write_results(results)
            (self.dirs[k].path / rundir.PREVIOUS).unlink(missing_ok=True)
            return self.dirs[k].path / rundir.RESULTS
        return None


@dataclass
class Outcome:
    """How a group's training ended: the finished runs' results (None when stopped early),
    why runs diverged, and, when some diverged midway, the others that go on and their
    states (as a smaller group, from where they are)."""

    results: list[dict[str, Any]] | None
    diverged: list[str]
    go_on: tuple[list[int], list[Checkpoint], int] | None = None  # live runs, their states, the last checkpoint step


@dataclass
class Progress:
    """What the loop carries from one iteration to the next."""

    saved: int  # the step of the latest checkpoint
    records: list[dict[str, Any]]  # each run's metrics at the latest iteration
    dead: list[int] = dataclasses.field(default_factory=list)  # runs that diverged at this iteration
    messages: list[str] = dataclasses.field(default_factory=list)


def _train(s: Session, files: Files, states: list[Checkpoint] | None, stop_at: int | None,
           deadline: float | None, saved: int | None = None) -> Outcome:
    cfg = s.cfg
    window = Window(s.device, cfg.batch_size, s.runs)
    start, clock = restore(s, states, window) if states is not None else (0, Clock())
    files.begin(s.cfgs, start)
    reporter = start_reporting(s, files, start)
    p = Progress(start if saved is None else saved, [{} for _ in s.cfgs])
    ends = {c.iters for c in s.cfgs}  # a run of a sweep may stop before the others: it leaves the group there
    with StopFlag() as stop:
        for done, lrs, batch in iterations(s, start):
            s.step.set_lr(lrs)
            window.add(*s.step(*batch))
            clock.tick()
            reporter.advance()
            logged = done % cfg.log_every == 0 or done in ends
            if not logged and reporter.wants_early(done):  # for the bar alone, never logged: one host sync each
                reporter.early(done, lrs, window.peek(s.dist), s.labels)
            p.records = read_metrics(s, window, clock, logged, done % cfg.eval_every == 0 or done in ends)
            p.dead = [k for k, r in enumerate(p.records) if not math.isfinite(r.get("train_loss", 0.0))]
            p.messages = []
            if p.records[0]:
                log(s, files, reporter, p, done, lrs, clock)
            stopping = stop.signum is not None or done == stop_at or (deadline is not None and
                                                                      time.monotonic() >= deadline)
            if s.dist.world_size > 1:  # agree at the log points (a sync there anyway), so all stop together
                stopping = logged and distributed.any_rank(stopping, s.dist)
            due = done % cfg.checkpoint_every == 0 or done in ends or stopping
            if due or p.dead:
                with clock.paused():
                    states = checkpoint_point(s, files, window, clock, p, done, due)
                live = [k for k in range(s.runs) if k not in p.dead]
                ending = [k for k in live if s.cfgs[k].iters == done]
                if (p.dead or ending or stopping) and done < s.iters:
                    reporter.close()
                    results = [finish(s, k, files, p.records[k], clock, reporter, fused_with(s)) for k in ending]
                    if stopping:
                        reporter.message(f"stopped at iteration {done}; checkpoint saved. Continue with: "
                                         f"python -m fastres.train --resume {shlex.quote(str(files.dirs[0].path))}")
                        return Outcome(None, p.messages)
                    going = [k for k in live if k not in ending]  # they go on as a smaller group, from here
                    return Outcome(results, p.messages, (going, [states[live.index(k)] for k in going], p.saved))
        reporter.close()
        # the last iteration is always evaluated: its records hold the final errors. Still under
        # the StopFlag: a Ctrl-C now waits for the results, which take a moment
        results = [finish(s, k, files, p.records[k], clock, reporter, fused_with(s)) for k in range(s.runs)
                   if k not in p.dead]
    return Outcome(results, p.messages)


def fused_with(s: Session) -> list[str] | None:
    """What a fused run's results name as its group (None for a run trained alone)."""
    return [c.out for c in s.cfgs] if s.runs > 1 else None


def iterations(s: Session, start: int) -> Iterator[tuple[int, list[float], tuple[torch.Tensor, ...]]]:
    """(iterations done after this step, each run's learning rate for it, its batch) from
    `start` to the end: the loader position and the lr are pure functions of the iteration."""
    spe = s.data.train.steps_per_epoch
    batches = s.data.train.epoch(start // spe, start % spe)
    for step in range(start, s.iters):
        if step % spe == 0 and step != start:
            batches = s.data.train.epoch(step // spe)
        yield step + 1, [c.lr_at(step) for c in s.cfgs], next(batches)


def log(s: Session, files: Files, reporter: Reporter, p: Progress, done: int, lrs: list[float],
        clock: Clock) -> None:
    """A log point: each live run's record into its metrics log and the display. An
    evaluation made because another run of the group ends here is not logged for a run
    whose own schedule has none here: each run logs what it would alone."""
    head = {"iter": done, "epoch": round(done / s.data.train.steps_per_epoch, 4)}
    p.records = [{**head, "lr": lr, **r, "wall_s": round(clock.wall(), 3)}
                 for r, lr in zip(p.records, lrs, strict=True)]
    for k, record in enumerate(p.records):
        if done % s.cfg.eval_every and done != s.cfgs[k].iters:
            for name in s.data.evals:
                record.pop(f"{name}_error", None)
        if k not in p.dead:
            files.log(k, record)
    reporter.log([r for k, r in enumerate(p.records) if k not in p.dead],
                 [label for k, label in enumerate(s.labels) if k not in p.dead])


def checkpoint_point(s: Session, files: Files, window: Window, clock: Clock, p: Progress, done: int,
                     due: bool) -> list[Checkpoint]:
    """A checkpoint point (or a divergence): the runs that diverged are noted and left out,
    the others' checkpoints are written when due. Returns the live runs' states."""
    if due:  # never overwrite a run's last good checkpoint with a diverged one
        p.dead = sorted(set(p.dead) | set(not_finite(s, window)))
    p.messages = [diverged(s, k, done, p.saved) for k in p.dead]
    for k, message in zip(p.dead, p.messages, strict=True):
        files.log(k, {"iter": done, "diverged": message})
    live = [k for k in range(s.runs) if k not in p.dead]
    if not live:
        raise RunError(p.messages[0] if len(p.messages) == 1 else
                       f"all {len(p.messages)} runs of the group diverged; {p.messages[0]}")
    for message in p.messages:  # the error of the last run to end says it again
        print(f"fastres: {message}; the other runs go on", file=sys.stderr)
    states = member_states(s, done, window, clock, live)
    if due:
        files.save(live, states)
        p.saved = done
    return states


def read_metrics(s: Session, window: Window, clock: Clock, logged: bool, evaluated: bool) -> list[dict[str, Any]]:
    """Each run's training loss, error and it/s at a log point, and its test (and val)
    error at an evaluation; empty records otherwise. The window's read is the host sync:
    the clock is read after it, so device work still queued counts as training, not as
    evaluation."""
    records: list[dict[str, Any]] = [{} for _ in s.cfgs]
    if logged:
        read = window.read(s.dist)
        steps, seconds = clock.lap_window()
        shared = {"it_s": steps / seconds, **s.step.read_skipped()}
        for record, values in zip(records, read, strict=True):
            record.update(values, **shared)
    if evaluated:
        if not logged and s.device.type == "cuda":
            torch.cuda.synchronize(s.device)  # queued training work is training time, not evaluation's
        with clock.paused():
            errors = {f"{name}_error": s.step.errors(loader) for name, loader in s.data.evals.items()}
        for k, record in enumerate(records):
            record.update({name: errs[k] for name, errs in errors.items()})
    return records


def restore(s: Session, states: list[Checkpoint], window: Window) -> tuple[int, Clock]:
    """Put the runs' checkpoints (all at one step) back into the fused model, optimiser,
    scaler and metric window. Returns the step to go on from and the clock. A checkpoint
    whose tensors do not fit this run is one line naming its run."""
    first = states[0]
    if any(state.step != first.step for state in states):
        raise RunError(f"the runs' checkpoints are at different steps: {[state.step for state in states]}")
    try:
        s.model.load_state_dict(fused.join_states([state.model for state in states]))
        s.step.optimizer.load_state_dicts([state.optimizer for state in states])
        s.step.scaler.load_state_dict(first.scaler)
        window.load(Sums(torch.cat([state.loss_sum.reshape(-1) for state in states]),
                         torch.cat([state.wrong_sum.reshape(-1) for state in states]), first.window), s.dist)
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{', '.join(c.out for c in s.cfgs)}: the checkpoint does not fit its run's model and "
                       f"optimiser ({why[:200]})") from None
    return first.step, Clock(first.train_time, first.wall_time)


def start_reporting(s: Session, files: Files, start: int) -> Reporter:
    """Say in a few lines what is about to run (the full config is in each run's config.json),
    and return the progress display."""
    cfg = s.cfg
    if s.dist.is_main:
        for note in s.notes:
            print(f"fastres: {note}", file=sys.stderr)
        for c in dict.fromkeys((c.milestones, c.iters) for c in s.cfgs):
            late = [m for m in c[0] if m >= c[1]]
            if late:  # allowed (a prefix of a longer schedule), but never silent
                print(f"fastres: note: milestones {', '.join(map(str, late))} are not below --iters {c[1]}: "
                      "the learning rate does not drop there", file=sys.stderr)
    title = cfg.model if s.runs == 1 else f"{cfg.model} x{s.runs}"
    reporter = Reporter(cfg.progress if s.dist.is_main else "none", s.iters, start, title, cfg.log_every)
    fused_note = f", {s.runs} runs fused ({', '.join(s.labels)})" if s.runs > 1 else ""
    configs = [str(d.path / rundir.CONFIG) for d in files.dirs]
    warmup = f", warm-up {cfg.warmup_iters} at {cfg.warmup_lr:g}" if cfg.warmup_iters else ""
    warmup += f"; each run its own {', '.join(s.swept)}" if s.swept else ""
    reporter.message(summary(f"{cfg.spec.tag}, {count_parameters(s.model) // s.runs:,} parameters{fused_note}", {
        "data": f"{s.data.source}; {s.data.train_size:,} training images",
        "device": f"{device_name(s.device)}; {cfg.precision}" + (", compiled" if cfg.compile else ""),
        "schedule": f"{schedule.describe(cfg.iters, cfg.milestones)} (from {cfg.lr:g}{warmup}); batch {cfg.batch_size}",
        "config": configs[0] + (f" and {len(configs) - 1} more, one per run" if len(configs) > 1 else ""),
    }))
    if start:
        reporter.message(f"fastres: resuming from iteration {start} of {s.iters}")
    return reporter


def not_finite(s: Session, window: Window) -> list[int]:
    """The runs whose losses since the last read or whose weights are not all finite (a
    host sync, at checkpoints only). Every tensor of a fused model is the runs' tensors
    stacked on dim 0, so each run's share is checked apart."""
    checks = [window.loss.isfinite()]
    for t in s.model.state_dict().values():
        if t.is_floating_point():
            checks.append(t.detach().reshape(s.runs, -1).isfinite().all(1))
    ok = torch.stack(checks).all(0).tolist()
    return [k for k, fine in enumerate(ok) if not fine]


def diverged(s: Session, k: int, step: int, saved: int) -> str:
    """What stops run k of a diverged run or group (also noted in its metrics.jsonl)."""
    cause = f"the learning rate ({s.cfg.lr_at(step - 1):g}) is too high for this run"
    if s.cfg.precision == "fp16":
        cause += ", or fp16 overflowed"
    where = f"{s.cfgs[k].out}: " if s.runs > 1 else ""
    kept = (f"the last good checkpoint, iteration {saved}, is kept" if saved else
            "no checkpoint was written before it: start again with a lower --lr (or a --warmup-iters)")
    return (f"{where}training diverged at iteration {step}: the training loss is not finite (likely cause: "
            f"{cause}); {kept}")


def member_states(s: Session, step: int, window: Window, clock: Clock, members: list[int]) -> list[Checkpoint]:
    """The checkpoint of each of `members`, in a single run's format: its config, weights,
    optimiser, position, metric window (summed over processes: every process takes part),
    clocks and the normalisation evaluation needs."""
    models = fused.split_state(s.model.state_dict(), s.runs)
    optimizers = s.step.optimizer.state_dicts()
    sums = window.state(s.dist)
    norm = Normalization(torch.from_numpy(s.prepared.mean), torch.from_numpy(s.prepared.std))
    return [Checkpoint(config=s.cfgs[k], step=step, model=models[k], optimizer=optimizers[k],
                       scaler=s.step.scaler.state_dict(), loss_sum=sums.loss[k:k + 1].clone(),
                       wrong_sum=sums.wrong[k:k + 1].clone(), window=sums.steps,
                       train_time=clock.train_time, wall_time=clock.wall(), normalization=norm)
            for k in members]


def finish(s: Session, k: int, files: Files, final: dict[str, Any], clock: Clock, reporter: Reporter,
           fused_with: list[str] | None) -> dict[str, Any]:
    """The results of run k, finished: the final-iteration errors and what produced them."""
    cfg = s.cfgs[k]
    results = {
        "model": cfg.model, "shortcut": cfg.shortcut, "dataset": cfg.dataset,
        "params": count_parameters(s.model) // s.runs, "iters": cfg.iters,
        "test_error": final.get("test_error"), "val_error": final.get("val_error"), "precision": cfg.precision,
        "train_time_s": round(clock.train_time, 3), "wall_time_s": round(clock.wall(), 3),
        "mean_it_s": round(cfg.iters / clock.train_time, 3),
        "device": device_name(s.device), "world_size": s.dist.world_size, "versions": versions(),
        "commit": git_commit(), "seed": cfg.seed, "data": s.data.source, "config": cfg.to_dict(),
        "fused_with": fused_with,
    }
    where = files.results(k, results)
    if where is not None:
        prefix = f"{cfg.out}: " if s.runs > 1 else ""
        reporter.message(f"{prefix}final test error {100 * results['test_error']:.2f}% after {cfg.iters} iterations "
                         f"({results['mean_it_s']} it/s); results in {where}")
    return results


def resume_check(args: argparse.Namespace) -> Callable[[list[RunConfig], int], None]:
    """What `--resume` refuses: another model than the saved one, or options that would
    change the saved config."""
    def check(cfgs: list[RunConfig], step: int) -> None:
        if args.model and parse_spec(args.model, args.shortcut) != cfgs[0].spec:
            raise UsageError(f"--resume {' '.join(args.resume)} holds {cfgs[0].spec.tag} runs, not {args.model}")
        fixed = {"model", "resume", "fuse", *resume_overrides()}
        changed = [k for k, v in vars(args).items() if v is not None and k not in fixed]
        if changed:
            raise UsageError(f"--resume continues the saved config; it cannot change {', '.join(changed)}")
    return check


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume:
        overrides = {k: getattr(args, k) for k in resume_overrides() if getattr(args, k)}
        return 0 if resume(args.resume, overrides, resume_check(args), alone=args.fuse == "off") is not None else 130
    cfgs = configs_from_args(args)
    device = pick_device(cfgs[0].device)
    groups, note = group.plan(cfgs, args.fuse or "auto", device.type, int(os.environ.get("WORLD_SIZE", "1")),
                              args.group_size)
    if note:
        print(f"fastres: {note}", file=sys.stderr)
    for members in groups:
        if train_group(members) is None:
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
