"""Train a CIFAR-10 ResNet with the paper's recipe: `python -m fastres.train resnet56 --amp`.

One flat loop, top to bottom. The learning rate is a pure function of the iteration; the
loader position is a pure function of the iteration too, so a checkpoint holds all the
state a run needs and a resumed run continues bit for bit (on CPU).
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fastres import checkpoint, distributed
from fastres.atomic import write_json
from fastres.cli import run_main
from fastres.config import RunConfig, build_parser, config_from_args, validate
from fastres.data import loaders
from fastres.errors import UsageError
from fastres.models import build_model, count_parameters
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

    def __init__(self, train_time: float, wall_time: float) -> None:
        self.train_time, self._wall0, self._start = train_time, wall_time, time.perf_counter()
        self._mark, self._window, self._running = self._start, 0.0, True

    def _lap(self) -> None:
        now = time.perf_counter()
        if self._running:
            self.train_time += now - self._mark
            self._window += now - self._mark
        self._mark = now

    def pause(self) -> None:
        self._lap()
        self._running = False

    def resume(self) -> None:
        self._lap()
        self._running = True

    def lap_window(self) -> float:
        self._lap()
        seconds, self._window = self._window, 0.0
        return seconds

    def wall(self) -> float:
        return self._wall0 + time.perf_counter() - self._start


def train(cfg: RunConfig, resume: dict[str, Any] | None = None, stop_at: int | None = None) -> dict[str, Any] | None:
    """Run (or continue) training. Returns the results, or None when stopped early by a
    signal or by `stop_at` (the same path: checkpoint, then return)."""
    dist = distributed.setup()
    try:
        return _train(cfg, dist, resume, stop_at)
    finally:
        distributed.teardown(dist)


def _train(cfg: RunConfig, dist: distributed.DistInfo, resume: dict[str, Any] | None,
           stop_at: int | None) -> dict[str, Any] | None:
    device = pick_device(cfg.device) if dist.world_size == 1 else dist.device
    run_dir = checkpoint.prepare_run_dir(cfg.out, resuming=resume is not None) if dist.is_main else Path(cfg.out)
    if cfg.batch_size % dist.world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} does not split over {dist.world_size} processes")
    configure_backends(device)
    precision, note = resolve_precision(device, cfg.precision or requested_precision(cfg.amp, cfg.amp_dtype))
    cfg = dataclasses.replace(cfg, precision=precision)
    dtype = PRECISIONS[precision]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.shortcut).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    where = loaders.Placement(device, dtype or torch.float32, cfg.channels_last, dist.rank, dist.world_size)
    data = loaders.build(loaders.prepare(cfg.data, cfg.val_split, cfg.seed, cfg.normalize), where,
                         batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size, seed=cfg.seed,
                         loader=cfg.loader)
    step_fn = TrainStep(distributed.wrap(model, dist), device, dtype, cfg.compile, momentum=cfg.momentum,
                        weight_decay=cfg.weight_decay)
    optimizer = step_fn.optimizer
    spe = data.train.steps_per_epoch
    log = checkpoint.MetricsLog(run_dir)

    start, train_time, wall_time = 0, 0.0, 0.0
    loss_sum = torch.zeros((), device=device)
    wrong_sum = torch.zeros((), dtype=torch.int64, device=device)
    window = 0  # steps accumulated since the last metrics read
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        step_fn.scaler.load_state_dict(resume["scaler"])
        start, train_time, wall_time = resume["step"], resume["train_time"], resume["wall_time"]
        window = resume["window"]
        if dist.is_main:  # the saved window sums are rank 0's (summed over ranks at the next read)
            loss_sum.copy_(resume["loss_sum"])
            wrong_sum.copy_(resume["wrong_sum"])
        if dist.is_main:
            log.truncate_after(start)
    if dist.is_main:
        write_json(run_dir / checkpoint.CONFIG, cfg.to_dict())
    params = count_parameters(model)
    reporter = Reporter(cfg.progress if dist.is_main else "none", cfg.iters, start, cfg.model)
    reporter.message(f"fastres: {cfg.model} ({params:,} parameters) on {device_name(device)}; "
                     f"data {data.source}; {data.train_size} training images, {spe} steps/epoch")
    reporter.message(f"config: {cfg}")
    if note and dist.is_main:
        print(f"fastres: {note}", file=sys.stderr)

    def save(step: int, clock: Clock) -> None:
        if not dist.is_main:
            return
        checkpoint.save(run_dir, {
            "config": cfg.to_dict(), "step": step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": step_fn.scaler.state_dict(),
            "loss_sum": loss_sum.cpu(), "wrong_sum": wrong_sum.cpu(), "window": window,
            "train_time": clock.train_time, "wall_time": clock.wall()})

    final: dict[str, float] = {}
    clock = Clock(train_time, wall_time)
    with StopFlag() as stop:
        batches = data.train.epoch(start // spe, start % spe)
        for step in range(start, cfg.iters):
            if step % spe == 0 and step != start:
                batches = data.train.epoch(step // spe)
            x, y = next(batches)
            lr = cfg.lr_at(step)
            step_fn.set_lr(lr)
            loss, wrong = step_fn(x, y)
            loss_sum += loss
            wrong_sum += wrong
            window += 1
            reporter.advance()
            done = step + 1
            record: dict[str, Any] = {}
            if done % cfg.log_every == 0 or done == cfg.iters:
                # note: reading the accumulators is the CPU-GPU sync point, once per log_every steps
                distributed.all_sum(loss_sum, dist)
                distributed.all_sum(wrong_sum, dist)
                record = {"train_loss": loss_sum.item() / (window * dist.world_size),
                          "train_error": wrong_sum.item() / (window * cfg.batch_size),
                          "it_s": window / clock.lap_window()}
                loss_sum.zero_()
                wrong_sum.zero_()
                window = 0
            if done % cfg.eval_every == 0 or done == cfg.iters:
                clock.pause()
                for name, loader in data.evals.items():
                    record[f"{name}_error"] = step_fn.error(loader)
                final.update({k: v for k, v in record.items() if k.endswith("_error")})
                clock.resume()
            if record:
                record = {"iter": done, "epoch": round(done / spe, 4), "lr": lr, **record,
                          "wall_s": round(clock.wall(), 3)}
                if dist.is_main:
                    log.append(record)
                reporter.log(record)
            stopping = stop.signum is not None or done == stop_at
            if dist.world_size > 1:  # agree at the log points (a sync there anyway), so all stop together
                stopping = bool(record) and distributed.any_rank(stopping, dist)
            if done % cfg.checkpoint_every == 0 or done == cfg.iters or stopping:
                clock.pause()
                save(done, clock)
                clock.resume()
            if stopping and done < cfg.iters:
                reporter.close()
                reporter.message(f"stopped at iteration {done}; checkpoint saved. Continue with: "
                                 f"python -m fastres.train --resume {run_dir}")
                return None
    reporter.close()
    results = {
        "model": cfg.model, "shortcut": cfg.shortcut, "params": params, "iters": cfg.iters,
        "test_error": final.get("test_error"), "val_error": final.get("val_error"),
        "precision": precision,
        "train_time_s": round(clock.train_time, 3), "wall_time_s": round(clock.wall(), 3),
        "mean_it_s": round(cfg.iters / clock.train_time, 3),
        "device": device_name(device), "world_size": dist.world_size, "versions": versions(),
        "commit": git_commit(), "seed": cfg.seed, "data": data.source, "config": cfg.to_dict(),
    }
    if dist.is_main:
        write_json(run_dir / checkpoint.RESULTS, results)
        reporter.message(f"final test error {100 * results['test_error']:.2f}% after {cfg.iters} iterations "
                         f"({results['mean_it_s']} it/s); results in {run_dir / checkpoint.RESULTS}")
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume:
        state = checkpoint.load(args.resume)
        cfg = checkpoint.config_of(state)
        if args.model and args.model != cfg.model:
            raise UsageError(f"--resume {args.resume} holds a {cfg.model} run, not {args.model}")
        fixed = {"model", "resume", *RESUME_OVERRIDES}
        changed = [k for k, v in vars(args).items() if v is not None and k not in fixed]
        if changed:
            raise UsageError(f"--resume continues the saved config; it cannot change {', '.join(changed)}")
        cfg = validate(dataclasses.replace(cfg, out=str(args.resume),
                                           **{k: getattr(args, k) for k in RESUME_OVERRIDES if getattr(args, k)}))
        if state["step"] >= cfg.iters:
            print(f"fastres: {args.resume} already finished {cfg.iters} iterations; nothing to do")
            return 0
        results = train(cfg, resume=state)
    else:
        results = train(config_from_args(args))
    return 0 if results is not None else 130


if __name__ == "__main__":
    sys.exit(run_main(main))
