"""Training throughput of fastres against a plain PyTorch baseline, in one run.

    python bench/throughput.py                       # GPU: resnet20, resnet56, resnet110
    python bench/throughput.py --device cpu --quick  # ResNet-20 on 2 CPU cores: 2 min 47 s measured, cold
    python bench/throughput.py --rows baseline,compile --models resnet56

Without a GPU, no arguments mean `--quick`: the full matrix on a CPU takes hours. With no
`--data`, CIFAR-10 is the official archive, downloaded to the cache, as training does.

Steady-state iterations/s at batch 128 (or --batch-size) for each configuration (warm-up,
compilation and graph capture timed apart; the device is synchronised around every timed
block; median and spread of several repeats), each row's speedup over the baseline of the
same model measured in the same run; loader-only images/s (one epoch by default);
evaluation images/s (warmed up first in every row); each row's own peak device memory over
what was held before it. The baseline
and the full fastres step of every model run first, so a run cut short keeps the headline
figures. Each row runs on its own: a row that fails is recorded with its error and the
others still run. The JSON is rewritten atomically after every row, and no row starts
after `--budget-s`. The table lists the rows in the matrix's order, model by model, whatever
order they ran in, and names under it the rows whose fastest repeat beat their slowest by more
than SPREAD (1.2x): figures from a busy machine.

Fused rows ("fused xN"): N runs of one model fused into one step (`fastres.fused`), with
the full fastres step (channels_last, AMP, compile); `run_it_s` counts run-iterations
(N per step), and `fused_speedup` is that over the "fused x1" row of the same model in the
same run: what fusing N runs gains over training them one after another. The sweep row
("sweep x4"): four runs of one seed, each with its own learning rate (a `--sweep lr=...`),
against "fused x4" (four seeds, one lr) in `vs_fused_seeds`: what per-run hyperparameters cost.

The full step with a part undone ("per-batch": batches made one at a time instead of from
slabs made ahead; "loss-outside": the model compiled alone, the loss eager after it;
"neither": both), to compare with the "compile" row of the same run: what each part gains.
`made_in_slabs` says how each row's training batches were made.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench import baseline  # noqa: E402
from fastres import fused, progress, recipe  # noqa: E402
from fastres.atomic import write_json  # noqa: E402
from fastres.cli import Parser, run_main  # noqa: E402
from fastres.config import parse_spec  # noqa: E402
from fastres.data import augmentation, loaders  # noqa: E402
from fastres.errors import RunError, UsageError  # noqa: E402
from fastres.models import build_model  # noqa: E402
from fastres.runtime import (  # noqa: E402
    PRECISIONS,
    configure_backends,
    device_name,
    pick_device,
    requested_precision,
    resolve_precision,
    tensor_dtype,
    versions,
)
from fastres.step import TrainStep, error_rates  # noqa: E402

SPREAD = 1.2  # a row whose fastest repeat is this much faster than its slowest was measured on a busy machine
# The GPU targets (one H100 or H200, batch 128, data loading included): (model, row) -> (the
# row's figure, its minimum). Checked on a GPU at batch 128 only (`meets_target`; null on a CPU
# or at another --batch-size). There is
# no target over the baseline: an earlier ">= 5x the baseline" assumed a slower baseline than
# an H100 gives, and what the baseline measures is its own DataLoader and eager step, not
# fastres; its ratio is still measured in the same run (`speedup`).
TARGETS = {("resnet56", "compile"): ("it_s", 400.0), ("resnet20", "compile"): ("it_s", 1000.0),
           ("resnet20", "fused-x8"): ("fused_speedup", 3.0), ("resnet20", "fused-x8-nchw"): ("fused_speedup", 3.0)}


@dataclass(frozen=True)
class Setup:
    """One row of the matrix: `tag` names it on the command line (`--rows`), `name` in the
    table, `about` in `--help`."""

    tag: str
    name: str
    about: str
    loader: str = "torch"  # baseline | torch | dali | host (torch loader on the host, each batch copied over)
    channels_last: bool = False
    amp: bool = False
    compile: bool = False
    key: bool = False  # a headline row: run first for every model
    runs: int | None = None  # a fused row: this many runs of the model in one step
    sweep: bool = False  # the runs are one seed with SWEEP_LRS, not seeds 0..N-1 with the paper's lr
    whole_step: bool = False  # the step one CUDA graph (TrainStep(whole_step=True)): CUDA only
    slabs: bool | None = None  # the torch loader's batches in slabs (None: its size rule), or one at a time
    compiled_loss: bool = True  # the loss compiled with the model (TrainStep's Objective), or eager after it


MATRIX = (
    Setup("baseline", "baseline (DataLoader, eager fp32)", "plain PyTorch (bench/baseline.py): DataLoader, NumPy "
          "augmentation, eager fp32; what speedups are over", loader="baseline", key=True),
    Setup("eager", "fastres eager fp32", "fastres' loader and training step, eager, fp32, NCHW"),
    Setup("channels-last", "+ channels_last", "+ the channels_last memory layout", channels_last=True),
    Setup("amp", "+ amp", "+ AMP: bf16 where native, else fp16 on a GPU, fp32 on a CPU",
          channels_last=True, amp=True),
    Setup("compile", "+ compile", "+ torch.compile (CUDA graphs on a GPU): the full fastres step",
          channels_last=True, amp=True, compile=True, key=True),
    Setup("whole-step", "+ compile, whole-step graph", "the full step as one CUDA graph, update included "
          "(CUDA only: skipped elsewhere)", channels_last=True, amp=True, compile=True, whole_step=True),
    # The full step with one of its parts undone, then both: what each part gains
    Setup("per-batch", "+ compile, batch by batch", "the full step fed batch by batch (about 9 loader kernels a "
          "step) instead of from slabs made ahead: what slabs gain", channels_last=True, amp=True, compile=True,
          slabs=False),
    Setup("loss-outside", "+ compile, loss outside the graph", "the model compiled alone, the loss and wrong "
          "counts eager after it: what compiling them with the model gains", channels_last=True, amp=True,
          compile=True, compiled_loss=False),
    Setup("neither", "+ compile, loss outside, batch by batch", "both parts undone: the compiled step without "
          "them", channels_last=True, amp=True, compile=True, slabs=False, compiled_loss=False),
    Setup("dali", "+ compile, DALI loader", "the full step fed by DALI (decoding on the GPU)", loader="dali",
          channels_last=True, amp=True, compile=True),
    Setup("host", "+ compile, host loader", "the full step fed from the host, each batch copied over",
          loader="host", channels_last=True, amp=True, compile=True),
    *(Setup(f"fused-x{n}", f"fused x{n}", f"{n} runs of the model fused into one full step" if n > 1 else
            "1 run through the fused step: what fused speedups are over",
            channels_last=True, amp=True, compile=True, runs=n) for n in (1, 2, 4, 8)),
    # Inductor turns its layout optimisation off for grouped convolutions, which a fused group
    # is made of: channels_last may then be many times slower than NCHW for them.
    Setup("fused-x8-nchw", "fused x8, NCHW", "8 runs fused into one step, NCHW: against fused x8 (channels_last), "
          "which layout the fused step wants", amp=True, compile=True, runs=8),
    Setup("sweep-x4", "sweep x4 (one seed, 4 lr)", "4 runs of one seed, each with its own lr, fused into one full "
          "step: against fused x4, what a sweep's per-run hyperparameters cost",
          channels_last=True, amp=True, compile=True, runs=4, sweep=True),
)
SWEEP_LRS = (0.05, 0.1, 0.2, 0.4)
ROWS = {s.tag: s for s in MATRIX}
NAME_WIDTH = max(len(s.name) for s in MATRIX)  # each row's progress line, its figure in one column
QUICK_LEAVES_OUT = ("fused-x8", "fused-x8-nchw")  # on a CPU the x8 row alone would take minutes
# loader_batches None: one epoch (`Bench.loader_rate`)
FULL_SIZES = {"warmup": 30, "steps": 100, "repeats": 5, "loader_batches": None, "profile_steps": 10}
QUICK_SIZES = {"warmup": 2, "steps": 5, "repeats": 3, "loader_batches": 5, "profile_steps": 3}
MODELS, QUICK_MODELS = "resnet20,resnet56,resnet110", "resnet20"

LOADERS = (  # (label, the row whose loader it is); --loaders names them by the row's tag
    ("baseline DataLoader, per-image NumPy", ROWS["baseline"]),
    ("torch, NCHW fp32", ROWS["eager"]),
    ("torch, channels_last, AMP dtype", ROWS["amp"]),
    ("torch, channels_last, AMP dtype, batch by batch", ROWS["per-batch"]),
    ("DALI, channels_last", ROWS["dali"]),
    ("torch on the host, copied to the device", ROWS["host"]),
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for fn(), with the device idle before and drained after."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


STEP_MARK = "fastres.step"  # the profiler's label of one profiled step


def profile_steps(steps: Callable[[int], None], device: torch.device, n: int) -> dict[str, Any]:
    """Kernels, host and device milliseconds per step over `n` steps under torch.profiler:
    which of the host and the device limits the step. `cpu_ms_per_step` is the host's time
    issuing a step (on a GPU the device may still be running it; a step that reads a loss,
    as the baseline's does, waits for it there); `gpu_ms_per_step` the device's busy time
    (the sum of its kernels' and copies' durations); `kernels_per_step` the device events
    (kernels, copies). On a CPU there are no kernels: `kernels_per_step` is null with the
    reason, and `cpu_ops_per_step` counts every op the profiler recorded (nested ones too)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(n):
            with record_function(STEP_MARK):
                steps(1)
        sync(device)
    events = prof.events()
    marks = [e for e in events if e.name == STEP_MARK and e.device_type == DeviceType.CPU]
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    ops = sum(e.device_type == DeviceType.CPU and e.name != STEP_MARK for e in events)
    return {"profile_steps": n, "cpu_ms_per_step": round(sum(e.cpu_time_total for e in marks) / 1e3 / n, 3),
            "gpu_ms_per_step": round(sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / n, 3) if cuda else None,
            "kernels_per_step": len(kernels) / n if cuda else None,
            "kernels_note": None if cuda else "no device kernels on a CPU: see cpu_ops_per_step",
            "cpu_ops_per_step": ops / n}


def target(model_name: str, row: dict[str, Any], device: torch.device, batch_size: int) -> dict[str, Any]:
    """The row's target (TARGETS) and whether it meets it: null without one, on a CPU, or at
    another batch than the paper's, the one the targets are set for."""
    want = TARGETS.get((model_name, row["tag"]))
    if want is None:
        return {"target": None, "meets_target": None}
    figure, least = want
    checked = device.type == "cuda" and batch_size == recipe.BATCH_SIZE and row.get(figure) is not None
    met = row[figure] >= least if checked else None
    return {"target": {"figure": figure, "min": least}, "meets_target": met}


def endless(loader: loaders.Loader) -> Iterator[loaders.Batch]:
    for epoch in itertools.count():
        yield from loader.epoch(epoch)


class FirstBatches:
    """An evaluation loader's first `n` batches (all of them for None): the GPU check's CPU
    rehearsal times a couple, where a CPU pass over the whole test set takes seconds a row."""

    def __init__(self, loader: loaders.Loader, n: int | None) -> None:
        self.loader, self.n = loader, n

    def epoch(self, epoch: int, start: int = 0) -> Iterator[loaders.Batch]:
        return itertools.islice(self.loader.epoch(epoch, start), self.n)


def evaluated_images(test_images: int, batches: int | None, batch: int) -> int:
    """How many images `FirstBatches(loader, batches)` holds: an evaluation loader keeps its
    last, smaller batch, so the first `batches` of `batch` images, or all of them."""
    return test_images if batches is None else min(test_images, batches * batch)


def made_in_slabs(loader: loaders.Loader) -> bool | None:
    """Whether a training loader makes its batches in slabs, as its size rule or the row chose
    (None: DALI's, which has none)."""
    made = loader.loader if isinstance(loader, loaders.HostToDevice) else loader
    return getattr(made, "slabs", None)


def order_rows(models: list[str], setups: list[Setup]) -> list[tuple[str, Setup]]:
    """Every model's key rows (baseline, full fastres step) first, then the rest: a run
    cut short still has each model's headline speedup."""
    key = [(m, s) for m in models for s in setups if s.key]
    return key + [(m, s) for m in models for s in setups if not s.key]


def available(setup: Setup, device: torch.device) -> str | None:
    """Why a row cannot run here, or None."""
    if setup.whole_step and device.type != "cuda":
        return "the whole-step graph needs CUDA"
    if setup.loader == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            return "DALI not installed"
    return None


class Bench:
    """One benchmark run: its arguments, device, data, results, and the JSON they go to."""

    def __init__(self, args: argparse.Namespace, on_save: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.args = args
        self.device = pick_device(args.device)
        configure_backends(self.device)
        if self.device.type == "cuda":  # the profiler's CUDA side set up before any graph is captured (pytorch#75504)
            torch.profiler._utils._init_for_cuda_graphs()
        self.deadline = time.monotonic() + args.budget_s
        self.data = loaders.prepare(args.data, progress=progress.resolve("auto"))  # first use: decoding shown
        # a batch the training split cannot fill: one line now (the baseline's DataLoader, whose
        # partial batch is dropped, would otherwise yield nothing, forever)
        augmentation.steps_per_epoch(len(self.data.splits.train), args.batch_size, train=True)
        self.on_save = on_save
        self.result: dict[str, Any] = {
            "device": device_name(self.device), "versions": versions(), "batch_size": args.batch_size,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "data": self.data.source.describe(),
            "args": {k: v for k, v in vars(args).items() if k not in ("data", "out")},
            "peak_mem_note": "peak_mem_mib: the row's own peak device memory above what was held when it started",
            "rows": [], "loaders": {}}

    def save(self) -> None:
        if self.args.out is not None:
            write_json(self.args.out, self.result)
        if self.on_save is not None:
            self.on_save(self.result)

    def precision(self, setup: Setup) -> str:
        """The row's precision, named as the trainer names it (fp32, bf16, fp16)."""
        return resolve_precision(self.device, requested_precision(setup.amp, "auto"))[0]

    def fastres_data(self, setup: Setup, precision: str) -> loaders.Data:
        where = loaders.Placement(self.device, tensor_dtype(precision), setup.channels_last,
                                  host=setup.loader == "host", slabs=setup.slabs)
        seeds = [0] * setup.runs if setup.sweep else list(range(setup.runs)) if setup.runs and setup.runs > 1 else 0
        return loaders.build(self.data, where, batch_size=self.args.batch_size, eval_batch_size=self.args.eval_batch,
                             seed=seeds, loader="dali" if setup.loader == "dali" else "torch")

    def row(self, model_name: str, setup: Setup) -> dict[str, Any]:
        """Measure one row; the caller records its failure, if any."""
        device, args = self.device, self.args
        torch.manual_seed(0)
        held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs = setup.runs or 1
        model = fused.fuse([build_model(model_name) for _ in range(runs)]).to(device)
        row: dict[str, Any] = {"precision": "fp32" if setup.loader == "baseline" else self.precision(setup)}
        if setup.loader == "baseline":
            split = self.data.splits.train
            batches = baseline.batches(baseline.make_loader(split.images, split.labels, self.data.mean,
                                                            args.batch_size, device))
            opt = torch.optim.SGD(model.parameters(), lr=recipe.LR, momentum=recipe.MOMENTUM,
                                  weight_decay=recipe.WEIGHT_DECAY)

            def steps(n: int) -> None:
                baseline.train_steps(model, opt, batches, device, n)
            evaluate = None
        else:
            if setup.channels_last:
                model = model.to(memory_format=torch.channels_last)
            dtype = PRECISIONS[row["precision"]]
            data = self.fastres_data(setup, row["precision"])
            row["made_in_slabs"] = made_in_slabs(data.train)
            train_batches = endless(data.train)
            step = TrainStep(model, device, dtype, setup.compile, runs=runs, whole_step=setup.whole_step,
                             compiled_loss=setup.compiled_loss)
            lrs = list(SWEEP_LRS) if setup.sweep else [recipe.LR] * runs

            def steps(n: int) -> None:
                acc = torch.zeros(runs, device=device)
                for _ in range(n):
                    step.set_lr(lrs)  # each step, as the trainer sets its schedule's
                    loss, _ = step(*next(train_batches))
                    acc += loss  # accumulated on the device, as the trainer does

            test = FirstBatches(data.evals["test"], args.eval_batches)

            def evaluate() -> None:
                error_rates(model, test, device, dtype, step.forward, runs)
        # The first steps compile, capture graphs and autotune: timed apart (cold compile time).
        row["first_steps_s"] = round(timed(lambda: steps(args.warmup), device), 3)
        rates = [args.steps / timed(lambda: steps(args.steps), device) for _ in range(args.repeats)]
        row.update(it_s=statistics.median(rates), it_s_min=min(rates), it_s_max=max(rates), repeats=rates)
        if setup.runs:
            row["run_it_s"] = row["it_s"] * runs
        row.update(profile_steps(steps, device, args.profile_steps))
        if evaluate is not None:
            # eager on CUDA (fastres/step.py, _predictions): the first pass pays cuDNN's autotuning
            # and the allocator's growth; on a CPU the compiled forward's eval-mode compile
            row["eval_first_s"] = round(timed(evaluate, device), 3)
            images = evaluated_images(len(self.data.splits.test), args.eval_batches, args.eval_batch)
            row["eval_img_s"] = images / timed(evaluate, device)
        if device.type == "cuda":
            row["peak_mem_mib"] = round((torch.cuda.max_memory_allocated(device) - held) / 2**20, 1)
        return row

    def loader_rate(self, setup: Setup) -> float:
        """Images/s of a loader alone (decode where it decodes, augment, lay out; no model)."""
        device = self.device
        if setup.loader == "baseline":
            split = self.data.splits.train
            loader = baseline.make_loader(split.images, split.labels, self.data.mean, self.args.batch_size, device)
            epoch = len(loader)
            batches = (loaders.to_device(b, device) for b in baseline.batches(loader))
        else:
            train = self.fastres_data(setup, self.precision(setup)).train
            epoch, batches = train.steps_per_epoch, endless(train)
        # By default one epoch, from the third batch of one to the second of the next: what the
        # torch loader makes ahead in slabs inside that window is exactly what the window uses
        # (its slabs grow 1, 2, 4, ... batches from each epoch's start), where a shorter window
        # would time the making of a slab it then used only in part.
        n = self.args.loader_batches or epoch

        def pull(k: int) -> None:
            for _ in range(k):
                next(batches)
        pull(2)
        return n * self.args.batch_size / timed(lambda: pull(n), device)

    def not_run(self, setup: Setup) -> str | None:
        """Why a row or a loader is not run now (not available here, or the budget spent), or None."""
        return available(setup, self.device) or ("budget spent" if time.monotonic() > self.deadline else None)

    def run(self, matrix: list[Setup]) -> dict[str, Any]:
        base: dict[str, float] = {}
        alone: dict[str, float] = {}  # each model's "fused x1" run-iterations/s
        seeds4: dict[str, float] = {}  # each model's "fused x4" it/s, what the sweep row is compared with
        for model_name, setup in order_rows(self.args.models, matrix):
            row: dict[str, Any] = {"model": model_name, **dataclasses.asdict(setup)}
            started = time.perf_counter()
            reason = self.not_run(setup)
            if reason:
                row["skipped"] = reason
            else:
                try:
                    row.update(self.row(model_name, setup))
                except Exception as e:  # one broken row must not lose the others' measurements
                    row.update(error=f"{type(e).__name__}: {e}".splitlines()[0], traceback=traceback.format_exc())
                finally:
                    release(self.device)
            if "it_s" in row:
                if setup.loader == "baseline":
                    base[model_name] = row["it_s"]
                row["speedup"] = row["it_s"] / base[model_name] if model_name in base else None
            if "run_it_s" in row:
                if setup.runs == 1:
                    alone[model_name] = row["run_it_s"]
                if setup.tag == "fused-x4":
                    seeds4[model_name] = row["it_s"]
                row["fused_speedup"] = row["run_it_s"] / alone[model_name] if model_name in alone else None
                if setup.sweep:
                    row["vs_fused_seeds"] = row["it_s"] / seeds4[model_name] if model_name in seeds4 else None
            row.update(target(model_name, row, self.device, self.args.batch_size),
                       seconds=round(time.perf_counter() - started, 1))
            self.result["rows"].append(row)
            self.save()
            print(f"{model_name:10s} {setup.name:{NAME_WIDTH}s} {describe(row)}", flush=True)
        for row in self.result["rows"]:  # rows run before their model's baseline (--rows compile,baseline)
            if "it_s" in row and row["speedup"] is None and row["model"] in base:
                row["speedup"] = row["it_s"] / base[row["model"]]
        for label, setup in LOADERS:
            if setup.tag not in self.args.loaders:
                continue
            rate: float | str | None = self.not_run(setup)
            if rate is None:
                try:
                    rate = self.loader_rate(setup)
                except Exception as e:
                    rate = f"error: {type(e).__name__}: {e}".splitlines()[0]
                finally:
                    release(self.device)
            self.result["loaders"][label] = rate
            self.save()
        return self.result


def release(device: torch.device) -> None:
    """Free what a row left behind (its model, loaders, DataLoader workers)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def describe(row: dict[str, Any]) -> str:
    if "run_it_s" in row:
        gain = f", {row['fused_speedup']:.2f}x x1" if row.get("fused_speedup") else ""
        gain += f", {row['vs_fused_seeds']:.2f}x fused x4" if row.get("vs_fused_seeds") else ""
        return f"{row['it_s']:8.2f} it/s ({row['run_it_s']:.2f} run-it/s{gain})"
    if "it_s" in row:
        return f"{row['it_s']:8.2f} it/s"
    return f"skipped: {row['skipped']}" if "skipped" in row else f"FAILED: {row['error']}"


def table_order(rows: list[dict[str, Any]], models: list[str]) -> list[dict[str, Any]]:
    """The rows model by model, each model's in the matrix's order: the order a reader
    compares them in, not the order they ran in (headline rows first)."""
    place = {s.tag: i for i, s in enumerate(MATRIX)}
    return sorted(rows, key=lambda r: (models.index(r["model"]), place[r["tag"]]))


def spread_warning(rows: list[dict[str, Any]]) -> str | None:
    """One line naming the rows whose repeats spread by more than SPREAD: a median taken
    while something else ran is not a figure to quote."""
    busy = [f"{r['model']} {r['tag']}" for r in rows if "it_s" in r and r["it_s_max"] > SPREAD * r["it_s_min"]]
    if not busy:
        return None
    return (f"warning: the repeats of {', '.join(busy)} spread by more than {SPREAD}x (fastest/slowest): the "
            "machine was busy; rerun those rows (--models, --rows) before quoting them")


def figure(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def target_cell(row: dict[str, Any]) -> str:
    """`>=1000 it/s: yes`, `no`, or `?` where it is not checked (on a CPU, or at another batch
    than 128); `-` without a target."""
    if row.get("target") is None:
        return "-"
    met = {True: "yes", False: "no", None: "?"}[row["meets_target"]]
    unit = {"it_s": "it/s", "fused_speedup": "x fused x1"}.get(row["target"]["figure"], row["target"]["figure"])
    return f">={row['target']['min']:g} {unit}: {met}"


def unchecked_note(rows: list[dict[str, Any]]) -> str | None:
    """The line under the table that says why a target shows `?`."""
    if not any(r.get("target") is not None and r.get("meets_target") is None for r in rows):
        return None
    return (f"target ?: not checked; the targets are for one GPU at batch {recipe.BATCH_SIZE} "
            "(docs/benchmarks.md)")


COLUMNS = ("model", "configuration", "precision", "it/s (median)", "spread", "x baseline", "run-it/s", "x fused x1",
           "target", "kernels/step", "host ops/step", "CPU ms/step", "GPU ms/step", "warm-up s", "peak MiB",
           "eval img/s")


def table_cells(r: dict[str, Any]) -> list[str]:
    """A row's cells, one per COLUMNS; "-" where it has no such figure."""
    if "it_s" not in r:
        return [r["model"], r["name"], "", "-", describe(r).strip(), *["-"] * (len(COLUMNS) - 5)]
    return [r["model"], r["name"], r["precision"], f"{r['it_s']:.1f}", f"{r['it_s_min']:.1f}-{r['it_s_max']:.1f}",
            f"{r['speedup']:.2f}x" if r["speedup"] else "-", f"{r['run_it_s']:.1f}" if "run_it_s" in r else "-",
            f"{r['fused_speedup']:.2f}x" if r.get("fused_speedup") else "-", target_cell(r),
            figure(r.get("kernels_per_step"), ".0f"), figure(r.get("cpu_ops_per_step"), ",.0f"),
            figure(r.get("cpu_ms_per_step"), ".2f"), figure(r.get("gpu_ms_per_step"), ".2f"),
            f"{r['first_steps_s']:.1f}", str(r.get("peak_mem_mib", "-")),
            f"{r['eval_img_s']:.0f}" if "eval_img_s" in r else "-"]


def print_table(result: dict[str, Any]) -> None:
    """The rows as a table, leaving out the columns no row has a figure in (on a CPU: kernels,
    GPU time and memory; without fused rows: their columns)."""
    from rich.console import Console
    from rich.table import Table

    rows = table_order(result["rows"], result["args"]["models"])
    cells = [table_cells(r) for r in rows]
    shown = [k for k in range(len(COLUMNS)) if k < 5 or any(c[k] != "-" for c in cells)]  # it/s, spread: always
    table = Table(title=f"fastres throughput, batch {result['batch_size']}, {result['device']}")
    for k in shown:
        table.add_column(COLUMNS[k], justify="left" if k < 3 else "right")
    for c in cells:
        table.add_row(*(c[k] for k in shown))
    console = Console(width=max(200, Console().width))  # the table (up to 16 columns) stays readable in logs
    console.print(table)
    for line in (unchecked_note(rows), spread_warning(rows)):
        if line:
            console.print(line, soft_wrap=True, markup=False, highlight=False)  # one line, however long
    if result["loaders"]:
        loaders_table = Table(title="loaders alone")  # short: a title wider than the table wraps
        loaders_table.add_column("loader")
        loaders_table.add_column("images/s", justify="right")
        for name, rate in result["loaders"].items():
            loaders_table.add_row(name, rate if isinstance(rate, str) else f"{rate:,.0f}")
        console.print(loaders_table)


def flags(sizes: dict[str, int | None]) -> str:
    """Sizes as the command line spells them: `--warmup 2 --steps 5`."""
    return " ".join(f"--{name.replace('_', '-')} {value}" for name, value in sizes.items())


def build_parser() -> argparse.ArgumentParser:
    width = max(len(s.tag) for s in MATRIX)
    rows = "\n".join(f"  {s.tag:{width}}  {s.about}" for s in MATRIX)
    p = Parser(prog="python bench/throughput.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=f"rows (--rows), in the table's order:\n{rows}")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    p.add_argument("--models", metavar="NAMES", help=f"comma-separated (default {MODELS}; --quick: {QUICK_MODELS})")
    p.add_argument("--rows", metavar="NAMES", help="comma-separated row names, listed below (default all; --quick: "
                   f"all but {', '.join(QUICK_LEAVES_OUT)})")
    p.add_argument("--data", metavar="PATH", help="CIFAR-10 archive, image tree or folder (default: the official "
                   "archive, downloaded to the cache, as training does)")
    helps = {"warmup": "untimed steps first, for compilation and graph capture", "steps": "steps per timed repeat",
             "repeats": "timed repeats, for the median and spread", "loader_batches": "batches timed per loader alone",
             "profile_steps": "steps under torch.profiler after the timed ones: kernels, CPU and GPU ms per step"}
    for name, text in helps.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, metavar="N",
                       help=f"{text} (default {FULL_SIZES[name] or 'one epoch'}; --quick: {QUICK_SIZES[name]})")
    p.add_argument("--loaders", metavar="NAMES", default=",".join(s.tag for _, s in LOADERS),
                   help="comma-separated loaders to time alone, by their rows' names (default all: "
                   f"{', '.join(s.tag for _, s in LOADERS)}); '' for none")
    p.add_argument("--batch-size", type=int, default=recipe.BATCH_SIZE, metavar="N",
                   help=f"training batch, per run of a fused row (default the paper's {recipe.BATCH_SIZE}; the targets "
                   "are checked at it only)")
    p.add_argument("--eval-batch", type=int, default=1000, metavar="N", help="evaluation batch (default 1000)")
    p.add_argument("--eval-batches", type=int, metavar="N",
                   help="evaluate each row on the test set's first N batches of --eval-batch images only, for "
                   "its eval img/s (default: all of it)")
    p.add_argument("--quick", action="store_true",
                   help=f"the CPU-sized matrix (the default without a GPU): {flags(QUICK_SIZES)} --models "
                   f"{QUICK_MODELS}, no {', '.join(QUICK_LEAVES_OUT)} row; a flag given explicitly wins")
    p.add_argument("--budget-s", type=float, default=float("inf"), metavar="SECONDS",
                   help="start no row after this many seconds")
    p.add_argument("--out", type=Path, metavar="FILE", help="JSON output (default bench/out/throughput-<time>.json)")
    return p


def listed(flag: str, text: str) -> list[str]:
    """A comma-separated list from the command line; a name given twice is refused (the
    table would show two rows alike, and speedups over the wrong baseline)."""
    items = [item.strip() for item in text.split(",")]
    twice = next((item for i, item in enumerate(items) if item in items[:i]), None)
    if twice is not None:
        raise UsageError(f"{flag} names {twice} twice")
    return items


def parse_models(text: str) -> list[str]:
    """--models, each name checked as training checks it, before any row runs."""
    names = listed("--models", text)
    for name in names:
        try:
            parse_spec(name)
        except UsageError as e:
            raise UsageError(f"--models: {e}") from None
    return names


def parse_rows(text: str) -> list[str]:
    """--rows: names of the matrix's rows."""
    tags = listed("--rows", text)
    unknown = next((tag for tag in tags if tag not in ROWS), None)
    if unknown is not None:
        raise UsageError(f"--rows {unknown!r}: no such row; choose from {', '.join(ROWS)} (see --help)")
    return tags


def parse_loaders(text: str) -> list[str]:
    """--loaders: the tags of LOADERS' rows; empty for none."""
    if not text:
        return []
    tags, known = listed("--loaders", text), [s.tag for _, s in LOADERS]
    unknown = next((tag for tag in tags if tag not in known), None)
    if unknown is not None:
        raise UsageError(f"--loaders {unknown!r}: no such loader; choose from {', '.join(known)}")
    return tags


def check_sizes(args: argparse.Namespace) -> None:
    for name in ("steps", "repeats", "loader_batches", "batch_size", "eval_batch", "profile_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:  # loader_batches None: an epoch
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.eval_batches is not None and args.eval_batches < 1:
        raise UsageError(f"--eval-batches must be at least 1, got {args.eval_batches}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be 0 or more, got {args.warmup}")
    if math.isnan(args.budget_s) or args.budget_s < 0:
        raise UsageError(f"--budget-s must be 0 or more seconds, got {args.budget_s}")


def fill_defaults(args: argparse.Namespace) -> str | None:
    """Give what was not given its default, --quick's when asked for; return the line that
    says what --quick set (None without --quick)."""
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    chosen = {name: value for name, value in sizes.items() if getattr(args, name) is None}
    for name, value in chosen.items():
        setattr(args, name, value)
    if not args.loaders:  # no loader timed alone: its batch count is not worth a mention
        chosen.pop("loader_batches", None)
    said = [flags(chosen)] if chosen else []
    if args.models is None:
        args.models = QUICK_MODELS if args.quick else MODELS
        said.append(f"--models {args.models}")
    if args.rows is None:
        args.rows = ",".join(s.tag for s in MATRIX if not args.quick or s.tag not in QUICK_LEAVES_OUT)
        said.append(f"no {', '.join(QUICK_LEAVES_OUT)} row")
    if not args.quick:
        return None
    sets = ", ".join(said) or "nothing: every value it sets was given"
    return f"note: --quick sets {sets} (a flag given explicitly wins)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, every value checked before any work starts (a bad one is a UsageError)."""
    args = build_parser().parse_args(argv)
    no_gpu = not args.quick and args.device == "auto" and not torch.cuda.is_available()
    args.quick = args.quick or no_gpu
    note = fill_defaults(args)
    args.models, args.rows = parse_models(args.models), parse_rows(args.rows)
    args.loaders = parse_loaders(args.loaders)
    check_sizes(args)
    if no_gpu:
        print("bench: no GPU here: running the CPU-sized matrix (--quick); the full matrix on a CPU takes "
              "hours (ask for it with --device cpu)", flush=True)
    if note:
        print(note, flush=True)
    return args


def check_out(path: Path) -> None:
    """Refuse an --out that cannot be written now, not after the first row's minutes."""
    if path.is_dir():
        raise RunError(f"--out {path}: is a folder; name the JSON file to write")
    folder = next(p for p in path.absolute().parents if p.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise RunError(f"--out {path}: cannot write under {folder}")


def main(argv: list[str] | None = None, on_save: Callable[[dict[str, Any]], None] | None = None) -> int:
    args = parse_args(argv)
    if args.out is None and on_save is None:
        args.out = ROOT / "bench" / "out" / f"throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    if args.out is not None:
        check_out(args.out)
    started = time.perf_counter()
    bench = Bench(args, on_save)  # the device and the data are checked here, before anything is written
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    result = bench.run([ROWS[tag] for tag in args.rows])
    result["seconds"] = round(time.perf_counter() - started, 1)
    bench.save()
    print_table(result)
    if args.out is not None:
        print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
