"""Train a CIFAR-10 ResNet with the paper's recipe: `python -m fastres.train resnet56 --amp`.

One flat loop, top to bottom. The learning rate is a pure function of the iteration; the
loader position is a pure function of the iteration too, so a checkpoint holds all the
state a run needs and a resumed run continues bit for bit (on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastres import checkpoint, distributed
from fastres.atomic import write_json
from fastres.cli import run_main
from fastres.config import RunConfig, build_parser, config_from_args, parse_spec, validate
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
    pick_device,
    requested_precision,
    resolve_precision,
    versions,
)
from fastres.step import TrainStep

RESUME_OVERRIDES = ("device", "progress")  # options that may change on resume: they change no result


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
    """Everything a run trains with, built from its config before anything is written."""

    cfg: RunConfig
    dist: distributed.DistInfo
    device: torch.device
    model: nn.Module
    step: TrainStep
    data: loaders.Data
    prepared: loaders.Prepared
    note: str | None  # what the precision choice says, once


def setup(cfg: RunConfig, dist: distributed.DistInfo) -> Session:
    """Device, precision, data, model and step. Every error found here (bad batch size,
    bad data) comes before the run directory exists, so it leaves no trace on disk."""
    device = pick_device(cfg.device) if dist.world_size == 1 else dist.device
    if cfg.batch_size % dist.world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} does not split over {dist.world_size} processes")
    configure_backends(device, cfg.deterministic)
    precision, note = resolve_precision(device, cfg.precision or requested_precision(cfg.amp, cfg.amp_dtype))
    cfg = dataclasses.replace(cfg, precision=precision)
    dtype = PRECISIONS[precision]
    prepared = loaders.prepare(cfg.data, cfg.val_split, cfg.seed, cfg.normalize, dataset=cfg.dataset)
    where = loaders.Placement(device, dtype or torch.float32, cfg.channels_last, dist.rank, dist.world_size)
    data = loaders.build(prepared, where, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
                         seed=cfg.seed, loader=cfg.loader)
    torch.manual_seed(cfg.seed)
    model = cfg.spec.build(DATASETS[cfg.dataset].num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step = TrainStep(distributed.wrap(model, dist), device, dtype, cfg.compile, momentum=cfg.momentum,
                     weight_decay=cfg.weight_decay)
    return Session(cfg, dist, device, model, step, data, prepared, note)


def train(cfg: RunConfig, resume: dict[str, Any] | None = None, stop_at: int | None = None) -> dict[str, Any] | None:
    """Run (or continue) training. Returns the results, or None when stopped early by a
    signal or by `stop_at` (the same path: checkpoint, then return)."""
    checkpoint.refuse_overwrite(cfg.out, resuming=resume is not None)
    dist = distributed.setup()
    try:
        s = setup(cfg, dist)
        run_dir = checkpoint.prepare_run_dir(cfg.out, resuming=resume is not None) if dist.is_main else Path(cfg.out)
        with checkpoint.RunLock(run_dir, enabled=dist.is_main):
            return _train(s, run_dir, resume, stop_at)
    finally:
        distributed.teardown(dist)


def _train(s: Session, run_dir: Path, resume: dict[str, Any] | None, stop_at: int | None) -> dict[str, Any] | None:
    cfg, dist = s.cfg, s.dist
    window, log = Window(s.device, cfg.batch_size), checkpoint.MetricsLog(run_dir)
    start, clock = restore(s, resume, window, log) if resume is not None else (0, Clock())
    reporter, saved = start_reporting(s, run_dir, start), start
    spe, final = s.data.train.steps_per_epoch, {}
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
            record: dict[str, Any] = {}
            logged = done % cfg.log_every == 0 or done == cfg.iters
            if logged:
                steps, seconds = window.steps, clock.lap_window()
                record.update(window.read(dist)[0], it_s=steps / seconds, **s.step.read_skipped())
                if not math.isfinite(record["train_loss"]):
                    raise diverged(s, log, done, saved)
            if done % cfg.eval_every == 0 or done == cfg.iters:
                with clock.paused():
                    final = {f"{name}_error": s.step.error(loader) for name, loader in s.data.evals.items()}
                record.update(final)
            if record:
                record = {"iter": done, "epoch": round(done / spe, 4), "lr": lr, **record,
                          "wall_s": round(clock.wall(), 3)}
                if dist.is_main:
                    log.append(record)
                reporter.log(record)
            stopping = stop.signum is not None or done == stop_at
            if dist.world_size > 1:  # agree at the log points (a sync there anyway), so all stop together
                stopping = logged and distributed.any_rank(stopping, dist)
            if done % cfg.checkpoint_every == 0 or done == cfg.iters or stopping:
                with clock.paused():
                    if not finite(s, window):  # never overwrite the last good checkpoint with a diverged run
                        raise diverged(s, log, done, saved)
                    saved = save(s, run_dir, done, window, clock)
            if stopping and done < cfg.iters:
                reporter.close()
                reporter.message(f"stopped at iteration {done}; checkpoint saved. Continue with: "
                                 f"python -m fastres.train --resume {run_dir}")
                return None
    reporter.close()
    return finish(s, run_dir, final, clock, reporter)


def restore(s: Session, state: dict[str, Any], window: Window, log: checkpoint.MetricsLog) -> tuple[int, Clock]:
    """Put a checkpoint's model, optimiser, scaler and metric window back; drop the logged
    iterations past it (they are recomputed). Returns the step to go on from and the clock."""
    s.model.load_state_dict(state["model"])
    s.step.optimizer.load_state_dict(state["optimizer"])
    s.step.scaler.load_state_dict(state["scaler"])
    window.load(state, s.dist)
    if s.dist.is_main:
        log.truncate_after(state["step"])
    return state["step"], Clock(state["train_time"], state["wall_time"])


def start_reporting(s: Session, run_dir: Path, start: int) -> Reporter:
    """Write the config, say what is about to run, and return the progress display."""
    cfg = s.cfg
    if s.dist.is_main:
        write_json(run_dir / checkpoint.CONFIG, cfg.to_dict())
        if s.note:
            print(f"fastres: {s.note}", file=sys.stderr)
        late = [m for m in cfg.milestones if m >= cfg.iters]
        if late:  # allowed (a prefix of a longer schedule), but never silent
            print(f"fastres: note: milestones {', '.join(map(str, late))} are not below --iters {cfg.iters}: "
                  "the learning rate does not drop there", file=sys.stderr)
    reporter = Reporter(cfg.progress if s.dist.is_main else "none", cfg.iters, start, cfg.model)
    reporter.message(f"fastres: {cfg.model} ({count_parameters(s.model):,} parameters) on {device_name(s.device)}; "
                     f"data {s.data.source}; {s.data.train_size} training images, "
                     f"{s.data.train.steps_per_epoch} steps/epoch")
    reporter.message(f"config: {cfg}")
    return reporter


def finite(s: Session, window: Window) -> bool:
    """Whether the losses since the last read and every weight are finite (a host sync,
    at checkpoints only)."""
    checks = [window.loss.isfinite().all(), *(p.detach().isfinite().all() for p in s.model.parameters())]
    return bool(torch.stack(checks).all())


def diverged(s: Session, log: checkpoint.MetricsLog, step: int, saved: int) -> RunError:
    """The error that stops a diverged run, after noting it in metrics.jsonl."""
    cause = f"the learning rate ({s.cfg.lr_at(step - 1):g}) is too high for this run"
    if s.cfg.precision == "fp16":
        cause += ", or fp16 overflowed"
    message = (f"training diverged at iteration {step}: the training loss is not finite (likely cause: {cause}); "
               f"the last good checkpoint, iteration {saved}, is kept")
    if s.dist.is_main:
        log.append({"iter": step, "diverged": message})
    return RunError(message)


def save(s: Session, run_dir: Path, step: int, window: Window, clock: Clock) -> int:
    """The checkpoint: config, weights, optimiser, position, metric window (summed over
    processes: every process takes part), clocks, and the normalisation evaluation needs."""
    state = window.state(s.dist)
    if s.dist.is_main:
        checkpoint.save(run_dir, {
            "config": s.cfg.to_dict(), "step": step, "model": s.model.state_dict(),
            "optimizer": s.step.optimizer.state_dict(), "scaler": s.step.scaler.state_dict(), **state,
            "train_time": clock.train_time, "wall_time": clock.wall(),
            "normalization": {"mean": torch.from_numpy(s.prepared.mean), "std": torch.from_numpy(s.prepared.std)}})
    return step


def finish(s: Session, run_dir: Path, final: dict[str, float], clock: Clock, reporter: Reporter) -> dict[str, Any]:
    """The results of a finished run: the final-iteration errors and what produced them."""
    cfg = s.cfg
    results = {
        "model": cfg.model, "shortcut": cfg.shortcut, "dataset": cfg.dataset, "params": count_parameters(s.model),
        "iters": cfg.iters,
        "test_error": final.get("test_error"), "val_error": final.get("val_error"), "precision": cfg.precision,
        "train_time_s": round(clock.train_time, 3), "wall_time_s": round(clock.wall(), 3),
        "mean_it_s": round(cfg.iters / clock.train_time, 3),
        "device": device_name(s.device), "world_size": s.dist.world_size, "versions": versions(),
        "commit": git_commit(), "seed": cfg.seed, "data": s.data.source, "config": cfg.to_dict(),
    }
    if s.dist.is_main:
        write_json(run_dir / checkpoint.RESULTS, results)
        reporter.message(f"final test error {100 * results['test_error']:.2f}% after {cfg.iters} iterations "
                         f"({results['mean_it_s']} it/s); results in {run_dir / checkpoint.RESULTS}")
    return results


def resumed_config(args: argparse.Namespace) -> tuple[RunConfig, dict[str, Any] | None]:
    """The saved config of `--resume RUN_DIR` and its checkpoint; None for a run killed
    before its first checkpoint, which starts again from iteration 0 with its saved config."""
    run = Path(args.resume)
    if (run / checkpoint.CHECKPOINT).is_file() or not (run / checkpoint.CONFIG).is_file():
        state = checkpoint.load(run)
        cfg = checkpoint.config_of(state)
    else:
        state = None
        try:
            cfg = RunConfig.from_dict(json.loads((run / checkpoint.CONFIG).read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise RunError(f"{run / checkpoint.CONFIG}: unreadable config ({e})") from None
    if args.model and parse_spec(args.model, args.shortcut) != cfg.spec:
        raise UsageError(f"--resume {args.resume} holds a {cfg.spec.tag} run, not {args.model}")
    fixed = {"model", "resume", *RESUME_OVERRIDES}
    changed = [k for k, v in vars(args).items() if v is not None and k not in fixed]
    if changed:
        raise UsageError(f"--resume continues the saved config; it cannot change {', '.join(changed)}")
    overrides = {k: getattr(args, k) for k in RESUME_OVERRIDES if getattr(args, k)}
    return validate(dataclasses.replace(cfg, out=str(args.resume), **overrides)), state


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.resume:
        return 0 if train(config_from_args(args)) is not None else 130
    cfg, state = resumed_config(args)
    if state is not None and state["step"] >= cfg.iters:
        print(f"fastres: {args.resume} already finished {cfg.iters} iterations; nothing to do")
        return 0
    return 0 if train(cfg, resume=state) is not None else 130


if __name__ == "__main__":
    sys.exit(run_main(main))
