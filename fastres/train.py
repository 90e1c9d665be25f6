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
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastres import checkpoint, distributed, fused, group
from fastres.atomic import write_json
from fastres.cli import run_main
from fastres.config import RunConfig, build_parser, configs_from_args, parse_spec, resume_overrides, validate
from fastres.data import loaders
from fastres.data.dataset import DATASETS
from fastres.errors import RunError, UsageError
from fastres.metrics import Window
from fastres.models import count_parameters
from fastres.progress import Reporter
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
    across resumes; `lap_window` gives the training seconds since the last metrics read."""

    def __init__(self, train_time: float = 0.0, wall_time: float = 0.0) -> None:
        self.train_time, self._wall0, self._start = train_time, wall_time, time.perf_counter()
        self._mark, self._window, self._running = self._start, 0.0, True

    def _lap(self) -> None:
        now = time.perf_counter()
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

    def lap_window(self) -> float:
        self._lap()
        seconds, self._window = self._window, 0.0
        return seconds

    def wall(self) -> float:
        return self._wall0 + time.perf_counter() - self._start


@dataclass
class Session:
    """Everything a group of runs trains with (one run, unless fused), built from their
    configs before anything is written."""

    cfgs: list[RunConfig]  # one per run, alike but for seed and run directory
    dist: distributed.DistInfo
    device: torch.device
    model: nn.Module  # the runs' models fused into one (`fastres.fused`); one run's is its own model
    step: TrainStep
    data: loaders.Data
    prepared: loaders.Prepared
    notes: list[str]  # what the precision and thread count say, once each

    @property
    def cfg(self) -> RunConfig:
        """What the runs share (model, schedule, batch size...): the first run's config."""
        return self.cfgs[0]

    @property
    def runs(self) -> int:
        return len(self.cfgs)


def setup(cfgs: list[RunConfig], dist: distributed.DistInfo) -> Session:
    """Device, precision, data, models and step. Every error found here (runs that cannot be
    fused, bad batch size, bad data) comes before any run directory exists, so it leaves no
    trace on disk. Run k's model is initialised from its own seed, as it would be alone."""
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
    prepared = loaders.prepare(cfg.data, cfg.val_split, cfg.seed, cfg.normalize, dataset=cfg.dataset)
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
    step = TrainStep(distributed.wrap(model, dist), device, dtype, cfg.compile, momentum=cfg.momentum,
                     weight_decay=cfg.weight_decay, runs=len(cfgs))
    return Session(cfgs, dist, device, model, step, data, prepared, notes)


def train(cfg: RunConfig, resume: dict[str, Any] | None = None, stop_at: int | None = None,
          deadline: float | None = None) -> dict[str, Any] | None:
    """Run (or continue) one run. Returns its results, or None when stopped early by a
    signal, by `stop_at` (an iteration) or by `deadline` (a `time.monotonic()` instant): the
    same path for all three, checkpoint, then return."""
    results = train_group([cfg], None if resume is None else [resume], stop_at, deadline)
    return None if results is None else results[0]


@dataclass
class Outcome:
    """How a group's training ended: the finished runs' results (None when stopped early),
    why runs diverged, and, when some diverged midway, the others that go on and their
    states (as a smaller group, from where they are)."""

    results: list[dict[str, Any]] | None
    diverged: list[str]
    go_on: tuple[list[int], list[dict[str, Any]]] | None = None


def train_group(cfgs: list[RunConfig], resume: list[dict[str, Any]] | None = None,
                stop_at: int | None = None, deadline: float | None = None) -> list[dict[str, Any]] | None:
    """Train runs alike but for their seed as one fused group (or one run): each writes
    its own run directory in a single run's format. A run that diverges is stopped and
    reported, and the others go on; the error for it is raised once they have finished."""
    group.check(cfgs, int(os.environ.get("WORLD_SIZE", "1")))  # before joining any process group
    for cfg in cfgs:
        checkpoint.refuse_overwrite(cfg.out, resuming=resume is not None)
    dist = distributed.setup()
    failed: list[str] = []
    try:
        s = setup(cfgs, dist)
        run_dirs = [checkpoint.prepare_run_dir(c.out, resuming=resume is not None) if dist.is_main else Path(c.out)
                    for c in cfgs]
        with contextlib.ExitStack() as locks:
            for run_dir in run_dirs:
                locks.enter_context(checkpoint.RunLock(run_dir, enabled=dist.is_main))
            while True:
                outcome = _train(s, run_dirs, resume, stop_at, deadline)
                failed += outcome.diverged
                if outcome.go_on is None:
                    break
                live, resume = outcome.go_on  # the runs that did not diverge go on as a smaller group
                run_dirs = [run_dirs[k] for k in live]
                s = setup([s.cfgs[k] for k in live], dist)
    finally:
        distributed.teardown(dist)
    if failed:
        others = f"; the other {len(outcome.results)} run(s) of its group finished" if outcome.results else ""
        raise RunError(f"{failed[0]}{others}" + (f" ({len(failed) - 1} more diverged)" if len(failed) > 1 else ""))
    return outcome.results


def _train(s: Session, run_dirs: list[Path], resume: list[dict[str, Any]] | None, stop_at: int | None,
           deadline: float | None) -> Outcome:
    cfg, dist = s.cfg, s.dist
    window, logs = Window(s.device, cfg.batch_size, s.runs), [checkpoint.MetricsLog(d) for d in run_dirs]
    start, clock = restore(s, resume, window, logs) if resume is not None else (0, Clock())
    reporter, saved = start_reporting(s, run_dirs, start), start
    spe = s.data.train.steps_per_epoch
    records: list[dict[str, Any]] = [{} for _ in s.cfgs]  # each run's metrics at the latest iteration
    dead: list[int] = []  # runs that diverged at this iteration
    messages: list[str] = []
    with StopFlag() as stop:
        batches = s.data.train.epoch(start // spe, start % spe)
        for step in range(start, cfg.iters):
            if step % spe == 0 and step != start:
                batches = s.data.train.epoch(step // spe)
            lr = cfg.lr_at(step)
            s.step.set_lr(lr)
            window.add(*s.step(*next(batches)))
            reporter.advance()
            done = step + 1
            logged = done % cfg.log_every == 0 or done == cfg.iters
            records = read_metrics(s, window, clock, logged, done % cfg.eval_every == 0 or done == cfg.iters)
            dead = [k for k, r in enumerate(records) if not math.isfinite(r.get("train_loss", 0.0))]
            messages = []
            if records[0]:
                head, wall = {"iter": done, "epoch": round(done / spe, 4), "lr": lr}, round(clock.wall(), 3)
                records = [{**head, **r, "wall_s": wall} for r in records]
                if dist.is_main:
                    for k, (log, record) in enumerate(zip(logs, records, strict=True)):
                        if k not in dead:
                            log.append(record)
                reporter.log([r for k, r in enumerate(records) if k not in dead],
                             [c.seed for k, c in enumerate(s.cfgs) if k not in dead])
            stopping = (stop.signum is not None or done == stop_at
                        or (deadline is not None and time.monotonic() >= deadline))
            if dist.world_size > 1:  # agree at the log points (a sync there anyway), so all stop together
                stopping = logged and distributed.any_rank(stopping, dist)
            due = done % cfg.checkpoint_every == 0 or done == cfg.iters or stopping
            if due or dead:
                with clock.paused():
                    if due:  # never overwrite a run's last good checkpoint with a diverged one
                        dead = sorted(set(dead) | set(not_finite(s, window)))
                    messages = [diverged(s, k, logs[k], done, saved) for k in dead]
                    live = [k for k in range(s.runs) if k not in dead]
                    if not live:
                        raise RunError(messages[0] if len(messages) == 1 else
                                       f"all {len(messages)} runs of the group diverged; {messages[0]}")
                    for message in messages:  # the error of the last run to end says it again
                        print(f"fastres: {message}; the other runs go on", file=sys.stderr)
                    states = member_states(s, done, window, clock, live)
                    if due:
                        save(s, [run_dirs[k] for k in live], states)
                        saved = done
                    if dead and not stopping and done < cfg.iters:
                        reporter.close()
                        return Outcome(None, messages, (live, states))
            if stopping and done < cfg.iters:
                reporter.close()
                reporter.message(f"stopped at iteration {done}; checkpoint saved. Continue with: "
                                 f"python -m fastres.train --resume {run_dirs[0]}")
                return Outcome(None, messages)
    reporter.close()
    # the last iteration is always evaluated: its records hold the final errors
    results = [finish(s, k, run_dirs[k], records[k], clock, reporter) for k in range(s.runs) if k not in dead]
    return Outcome(results, messages)


def read_metrics(s: Session, window: Window, clock: Clock, logged: bool, evaluated: bool) -> list[dict[str, Any]]:
    """Each run's training loss, error and it/s at a log point, and its test (and val)
    error at an evaluation; empty records otherwise. Note: a host sync when not empty."""
    records: list[dict[str, Any]] = [{} for _ in s.cfgs]
    if logged:
        shared = {"it_s": window.steps / clock.lap_window(), **s.step.read_skipped()}
        for record, read in zip(records, window.read(s.dist), strict=True):
            record.update(read, **shared)
    if evaluated:
        with clock.paused():
            errors = {f"{name}_error": s.step.errors(loader) for name, loader in s.data.evals.items()}
        for k, record in enumerate(records):
            record.update({name: errs[k] for name, errs in errors.items()})
    return records


def restore(s: Session, states: list[dict[str, Any]], window: Window, logs: list[checkpoint.MetricsLog]
            ) -> tuple[int, Clock]:
    """Put the runs' checkpoints (all at one step) back into the fused model, optimiser,
    scaler and metric window; drop the logged iterations past them (they are recomputed).
    Returns the step to go on from and the clock."""
    first = states[0]
    if any(state["step"] != first["step"] for state in states):
        raise RunError(f"the runs' checkpoints are at different steps: {[state['step'] for state in states]}")
    s.model.load_state_dict(fused.join_states([state["model"] for state in states]))
    s.step.optimizer.load_state_dict(fused.join_optimizer_states([state["optimizer"] for state in states]))
    s.step.scaler.load_state_dict(first["scaler"])
    window.load({"loss_sum": torch.cat([state["loss_sum"].reshape(-1) for state in states]),
                 "wrong_sum": torch.cat([state["wrong_sum"].reshape(-1) for state in states]),
                 "window": first["window"]}, s.dist)
    if s.dist.is_main:
        for log in logs:
            log.truncate_after(first["step"])
    return first["step"], Clock(first["train_time"], first["wall_time"])


def start_reporting(s: Session, run_dirs: list[Path], start: int) -> Reporter:
    """Write the configs, say what is about to run, and return the progress display."""
    cfg = s.cfg
    if s.dist.is_main:
        for c, run_dir in zip(s.cfgs, run_dirs, strict=True):
            write_json(run_dir / checkpoint.CONFIG, c.to_dict())
            group.write_group(run_dir, [c.out for c in s.cfgs])
        for note in s.notes:
            print(f"fastres: {note}", file=sys.stderr)
        late = [m for m in cfg.milestones if m >= cfg.iters]
        if late:  # allowed (a prefix of a longer schedule), but never silent
            print(f"fastres: note: milestones {', '.join(map(str, late))} are not below --iters {cfg.iters}: "
                  "the learning rate does not drop there", file=sys.stderr)
    title = cfg.model if s.runs == 1 else f"{cfg.model} x{s.runs}"
    reporter = Reporter(cfg.progress if s.dist.is_main else "none", cfg.iters, start, title)
    fused_note = f", {s.runs} runs fused (seeds {', '.join(str(c.seed) for c in s.cfgs)})" if s.runs > 1 else ""
    reporter.message(f"fastres: {cfg.model} ({count_parameters(s.model) // s.runs:,} parameters{fused_note}) on "
                     f"{device_name(s.device)}; data {s.data.source}; {s.data.train_size} training images, "
                     f"{s.data.train.steps_per_epoch} steps/epoch")
    for c in s.cfgs:
        reporter.message(f"config: {c}")
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


def diverged(s: Session, k: int, log: checkpoint.MetricsLog, step: int, saved: int) -> str:
    """What stops run k of a diverged run or group, after noting it in its metrics.jsonl."""
    cause = f"the learning rate ({s.cfg.lr_at(step - 1):g}) is too high for this run"
    if s.cfg.precision == "fp16":
        cause += ", or fp16 overflowed"
    where = f"{s.cfgs[k].out}: " if s.runs > 1 else ""
    kept = (f"the last good checkpoint, iteration {saved}, is kept" if saved else
            "no checkpoint was written before it: start again with a lower --lr (or a --warmup-iters)")
    message = (f"{where}training diverged at iteration {step}: the training loss is not finite (likely cause: "
               f"{cause}); {kept}")
    if s.dist.is_main:
        log.append({"iter": step, "diverged": message})
    return message


def member_states(s: Session, step: int, window: Window, clock: Clock, members: list[int]) -> list[dict[str, Any]]:
    """The checkpoint of each of `members`, in a single run's format: its config, weights,
    optimiser, position, metric window (summed over processes: every process takes part),
    clocks and the normalisation evaluation needs."""
    models = fused.split_state(s.model.state_dict(), s.runs)
    optimizers = fused.split_optimizer_state(s.step.optimizer.state_dict(), s.runs)
    sums = window.state(s.dist)
    states = []
    for k in members:
        state = {"config": s.cfgs[k].to_dict(), "step": step, "model": models[k], "optimizer": optimizers[k],
                 "scaler": s.step.scaler.state_dict(), "loss_sum": sums["loss_sum"][k:k + 1].clone(),
                 "wrong_sum": sums["wrong_sum"][k:k + 1].clone(), "window": sums["window"],
                 "train_time": clock.train_time, "wall_time": clock.wall(),
                 "normalization": {"mean": torch.from_numpy(s.prepared.mean), "std": torch.from_numpy(s.prepared.std)}}
        states.append(state)
    return states


def save(s: Session, run_dirs: list[Path], states: list[dict[str, Any]]) -> None:
    """Write the runs' checkpoints, one after another; runs of a group keep their previous
    checkpoint, so a kill between two writes leaves a step every run holds."""
    if s.dist.is_main:
        for run_dir, state in zip(run_dirs, states, strict=True):
            checkpoint.save(run_dir, state, keep_previous=len(states) > 1)


def finish(s: Session, k: int, run_dir: Path, final: dict[str, Any], clock: Clock,
           reporter: Reporter) -> dict[str, Any]:
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
        "fused_with": [c.out for c in s.cfgs] if s.runs > 1 else None,
    }
    if s.dist.is_main:
        write_json(run_dir / checkpoint.RESULTS, results)
        prefix = f"{cfg.out}: " if s.runs > 1 else ""
        reporter.message(f"{prefix}final test error {100 * results['test_error']:.2f}% after {cfg.iters} iterations "
                         f"({results['mean_it_s']} it/s); results in {run_dir / checkpoint.RESULTS}")
    return results


def resumed_group(args: argparse.Namespace) -> tuple[list[RunConfig], list[dict[str, Any]] | None]:
    """The saved configs of `--resume RUN_DIR...` (a fused run brings its whole group) and
    the checkpoints of the latest step every run holds; None to start again from
    iteration 0 (runs killed before their first checkpoints were all written)."""
    saved, step = group.resume_point([Path(d) for d in args.resume])
    cfgs = [s.config for s in saved]
    if args.model and parse_spec(args.model, args.shortcut) != cfgs[0].spec:
        raise UsageError(f"--resume {' '.join(args.resume)} holds {cfgs[0].spec.tag} runs, not {args.model}")
    fixed = {"model", "resume", "fuse", *resume_overrides()}
    changed = [k for k, v in vars(args).items() if v is not None and k not in fixed]
    if changed:
        raise UsageError(f"--resume continues the saved config; it cannot change {', '.join(changed)}")
    overrides = {k: getattr(args, k) for k in resume_overrides() if getattr(args, k)}
    cfgs = [validate(dataclasses.replace(c, out=str(s.path), **overrides)) for c, s in zip(cfgs, saved, strict=True)]
    return cfgs, group.states_at(saved, step)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume:
        cfgs, states = resumed_group(args)
        if states is not None and states[0]["step"] >= cfgs[0].iters:
            print(f"fastres: {' '.join(args.resume)} already finished {cfgs[0].iters} iterations; nothing to do")
            return 0
    else:
        cfgs, states = configs_from_args(args), None
    device = pick_device(cfgs[0].device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.resume and len(cfgs) > 1 and args.fuse != "off":
        groups, note = [cfgs], None  # a fused group resumes fused, wherever it runs
    else:
        groups, note = group.plan(cfgs, args.fuse or "auto", device.type, world_size)
    if note:
        print(f"fastres: {note}", file=sys.stderr)
    by_out = {c.out: state for c, state in zip(cfgs, states or [None] * len(cfgs), strict=True)}
    for members in groups:
        resume = None if states is None else [by_out[c.out] for c in members]
        if train_group(members, resume) is None:
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
