"""Training throughput of fastres against a plain PyTorch baseline, in one run.

    python bench/throughput.py                      # GPU: resnet20, resnet56, resnet110
    python bench/throughput.py --device cpu --quick  # about two minutes on 2 cores

Steady-state iterations/s at batch 128 for each configuration (warm-up, compilation and
graph capture excluded and reported apart; the device is synchronised around every timed
block; median and spread of several repeats), each row's speedup over the baseline of the
same model measured in the same run; loader-only images/s; evaluation images/s; peak
device memory. Prints a rich table and writes everything to a JSON file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench import baseline  # noqa: E402
from fastres.config import RunConfig  # noqa: E402
from fastres.data import augment, loaders  # noqa: E402
from fastres.models import build_model  # noqa: E402
from fastres.runtime import amp_dtype, configure_backends, device_name, pick_device, versions  # noqa: E402
from fastres.step import TrainStep, error_rate  # noqa: E402

REAL_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg"
BATCH = 128


@dataclass(frozen=True)
class Setup:
    """One row of the matrix."""

    name: str
    loader: str = "torch"  # baseline | torch | dali | cpu (torch loader on the host, copied per batch)
    channels_last: bool = False
    amp: bool = False
    compile: bool = False


MATRIX = (
    Setup("baseline (DataLoader, eager fp32)", loader="baseline"),
    Setup("fastres eager fp32"),
    Setup("+ channels_last", channels_last=True),
    Setup("+ amp", channels_last=True, amp=True),
    Setup("+ compile", channels_last=True, amp=True, compile=True),
    Setup("+ compile, DALI loader", loader="dali", channels_last=True, amp=True, compile=True),
    Setup("+ compile, CPU loader", loader="cpu", channels_last=True, amp=True, compile=True),
)

LOADERS = (
    ("baseline DataLoader, per-image NumPy", MATRIX[0]),
    ("torch, NCHW fp32", MATRIX[1]),
    ("torch, channels_last bf16", MATRIX[3]),
    ("DALI, channels_last", MATRIX[5]),
    ("torch on the host, copied to the device", MATRIX[6]),
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


def endless(loader: loaders.Loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def to_device(batches: Iterator, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The CPU loader: batches made on the host, pinned and copied to the device."""
    for x, y in batches:
        if device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def available(setup: Setup, device: torch.device) -> str | None:
    """Why a row cannot run here, or None."""
    if setup.loader == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            return "DALI not installed"
    if setup.loader == "cpu" and device.type != "cuda":
        return "same as the torch loader without a GPU"
    return None


def fastres_data(args: argparse.Namespace, setup: Setup, device: torch.device, dtype: torch.dtype) -> loaders.Data:
    cfg = RunConfig(model="resnet20", data=args.data, loader="torch" if setup.loader == "cpu" else setup.loader,
                    eval_batch_size=args.eval_batch)
    where_device = torch.device("cpu") if setup.loader == "cpu" else device
    return loaders.build(cfg, loaders.Placement(where_device, dtype, setup.channels_last))


def run_row(args: argparse.Namespace, model_name: str, setup: Setup, device: torch.device,
            splits: Any, mean: np.ndarray) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(model_name).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row: dict[str, Any] = {"model": model_name, **dataclasses.asdict(setup)}
    if setup.loader == "baseline":
        data = baseline.batches(baseline.make_loader(splits.train.images, splits.train.labels, mean, BATCH, device))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

        def steps(n: int) -> None:
            baseline.train_steps(model, opt, data, device, n)
        evaluate = None
    else:
        if setup.channels_last:
            model = model.to(memory_format=torch.channels_last)
        dtype = amp_dtype(device, setup.amp, "auto")
        fr = fastres_data(args, setup, device, dtype or torch.float32)
        batches = endless(fr.train)
        if setup.loader == "cpu":
            batches = to_device(batches, device)
        step = TrainStep(model, RunConfig(model=model_name), device, dtype, setup.compile)
        zero = torch.zeros((), device=device)

        def steps(n: int) -> None:
            acc = zero.clone()
            for _ in range(n):
                x, y = next(batches)
                loss, _ = step(x, y)
                acc += loss  # accumulated on the device, as the trainer does

        def evaluate() -> None:
            error_rate(model, fr.evals["test"], device, dtype, step.forward)
    row["first_steps_s"] = round(timed(lambda: steps(args.warmup), device), 3)  # compile, capture, autotune
    rates = [args.steps / timed(lambda: steps(args.steps), device) for _ in range(args.repeats)]
    row.update(it_s=statistics.median(rates), it_s_min=min(rates), it_s_max=max(rates), repeats=rates)
    if device.type == "cuda":
        row["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if evaluate is not None:
        if setup.compile:
            evaluate()  # warm-up: eval-mode compilation and graphs
        row["eval_img_s"] = len(splits.test) / timed(evaluate, device)  # the whole test set, single view
    return row


def loader_rate(args: argparse.Namespace, setup: Setup, device: torch.device, splits: Any,
                mean: np.ndarray) -> float:
    """Images/s of a loader alone (decode where it decodes, augment, lay out; no model)."""
    if setup.loader == "baseline":
        batches = baseline.batches(baseline.make_loader(splits.train.images, splits.train.labels, mean, BATCH, device))
        batches = ((x.to(device, non_blocking=True), y) for x, y in batches)
    else:
        dtype = torch.bfloat16 if setup.amp else torch.float32
        batches = endless(fastres_data(args, setup, device, dtype).train)
        if setup.loader == "cpu":
            batches = to_device(batches, device)
    n = args.loader_batches

    def pull(k: int) -> None:
        for _ in range(k):
            next(batches)
    pull(2)
    return n * BATCH / timed(lambda: pull(n), device)


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fastres throughput, batch {BATCH}, {result['device']}")
    for col in ("model", "configuration", "it/s (median)", "spread", "x baseline", "warm-up s", "peak MiB",
                "eval img/s"):
        table.add_column(col, justify="left" if col in ("model", "configuration") else "right")
    for r in result["rows"]:
        if "skipped" in r:
            table.add_row(r["model"], r["name"], "-", r["skipped"], "", "", "", "")
            continue
        table.add_row(r["model"], r["name"], f"{r['it_s']:.1f}", f"{r['it_s_min']:.1f}-{r['it_s_max']:.1f}",
                      f"{r['speedup']:.2f}x", f"{r['first_steps_s']:.1f}", str(r.get("peak_mem_mib", "-")),
                      f"{r['eval_img_s']:.0f}" if "eval_img_s" in r else "-")
    loaders_table = Table(title="loaders alone (images/s)")
    loaders_table.add_column("loader")
    loaders_table.add_column("images/s", justify="right")
    for name, rate in result["loaders"].items():
        loaders_table.add_row(name, rate if isinstance(rate, str) else f"{rate:,.0f}")
    console = Console(width=max(140, Console().width))  # the table stays readable in logs
    console.print(table)
    console.print(loaders_table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--models", default="resnet20,resnet56,resnet110")
    p.add_argument("--data", default=str(REAL_DATA) if REAL_DATA.is_dir() else None,
                   help="CIFAR-10 source (default: the shared JPEG copy if present, else the official archive)")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps first (compilation, graph capture)")
    p.add_argument("--steps", type=int, default=100, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--loader-batches", type=int, default=100)
    p.add_argument("--eval-batch", type=int, default=1000)
    p.add_argument("--setups", help="comma-separated row numbers of the matrix to run (default all)")
    p.add_argument("--quick", action="store_true", help="resnet20 only, few steps: about two minutes on 2 CPU cores")
    p.add_argument("--out", type=Path, help="JSON output (default bench/out/throughput-<device>-<time>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.warmup, args.steps, args.repeats, args.loader_batches = "resnet20", 2, 5, 3, 5
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = pick_device(args.device)
    configure_backends(device)
    _, splits = loaders.load_splits(RunConfig(model="resnet20", data=args.data))
    mean, _ = augment.normalization_stats(splits.train.images)
    matrix = [MATRIX[int(i)] for i in args.setups.split(",")] if args.setups else list(MATRIX)
    result: dict[str, Any] = {
        "device": device_name(device), "versions": versions(), "batch_size": BATCH,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": {k: str(v) for k, v in vars(args).items()},
        "rows": [], "loaders": {}}
    for model_name in args.models.split(","):
        base = None
        for setup in matrix:
            reason = available(setup, device)
            if reason:
                result["rows"].append({"model": model_name, "name": setup.name, "skipped": reason})
                continue
            row = run_row(args, model_name, setup, device, splits, mean)
            base = row["it_s"] if setup.loader == "baseline" else base
            row["speedup"] = row["it_s"] / base if base else float("nan")
            result["rows"].append(row)
            print(f"{model_name:10s} {setup.name:36s} {row['it_s']:8.2f} it/s", flush=True)
    for label, setup in LOADERS:
        result["loaders"][label] = available(setup, device) or loader_rate(args, setup, device, splits, mean)
    out = args.out or ROOT / "bench" / "out" / f"throughput-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"written {out}")
    return result


if __name__ == "__main__":
    main()
