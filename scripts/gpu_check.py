"""The GPU check, one prepared command: `python scripts/gpu_check.py OUT_DIR --data DIR`.

Made for a GPU lent briefly, offline, with a hard limit per command: everything it measures
is in OUT_DIR/gpu_check.json (rewritten atomically after every benchmark row and every
part) and OUT_DIR/gpu_check.log, so a kill at any moment keeps what was measured. The parts,
most valuable first, each started only while the budget lasts:

1. throughput: ResNet-20 and ResNet-56, baseline and full fastres step of both first, then
   the rest of the matrix (bench/throughput.py), fused runs last, with cold compile times;
2. agreement: eager and compiled training steps on the same batches, in the configuration
   training uses (bf16, channels_last), then fp32 (the CPU rehearsal: fp64, see AGREE_REL);
3. the 64,000-iteration ResNet-20 run, if the measured it/s says it ends in time, else a
   bounded prefix (its length recorded, its checkpoint saved to resume elsewhere);
4. whatever the budget: the compile caches packed into OUT_DIR/compile_cache.tar.gz if they
   pack under 16 MiB, for the next check to start warm (`--compile-cache`, docs/gpu-check.md).

Without a GPU (or with --rehearse) the same code runs at tiny size on the CPU: every branch
the GPU run takes except CUDA graphs, fused CUDA SGD, pinned copies and DALI's mixed decoding.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import throughput  # noqa: E402
from fastres import recipe  # noqa: E402
from fastres.atomic import write_json  # noqa: E402
from fastres.cli import Parser, run_main  # noqa: E402
from fastres.config import RunConfig  # noqa: E402
from fastres.data import loaders  # noqa: E402
from fastres.models import build_model  # noqa: E402
from fastres.rundir import RunDir  # noqa: E402
from fastres.runtime import (  # noqa: E402
    PRECISIONS,
    configure_backends,
    device_name,
    param_dtype,
    pick_device,
    resolve_precision,
    tensor_dtype,
    versions,
)
from fastres.step import TrainStep  # noqa: E402
from fastres.train import train  # noqa: E402
from scripts import compile_cache  # noqa: E402

JSON, LOG = "gpu_check.json", "gpu_check.log"
# Eager and compiled trajectories drift apart step by step (kernel choice, fusion, rounding);
# over the steps compared their losses must stay this close (relative). On the GPU, fp32 and
# bf16, as training uses them (measured on CPU, 3 steps of ResNet-8: 1.4e-5 in fp32, 2.5e-4 in
# bf16). The CPU rehearsal compares in fp64, where the same drift starts from float64's
# rounding (1.1e-16 instead of fp32's 6e-8) and 3 steps amplify it far less than the 2e6 that
# 30 fused steps were measured to (tests/test_fused.py): below 1e-9 on any processor.
AGREE_REL = {"fp32": 1e-2, "bf16": 5e-2, "fp64": 1e-9}
# What the full run needs beyond its steps: 32 evaluations, checkpoints, a first compile
# that the benchmark's may not have covered. Measured figures replace it where present.
FULL_RUN_OVERHEAD_S = 30.0
LOG_EVERY = 100
# Seconds the benchmark leaves for agreement and the full run: at ResNet-20's target of
# 800 it/s the 64k run needs 80 s of steps, plus compilation and 32 evaluations.
RESERVE_GPU_S, RESERVE_CPU_S = 200.0, 60.0
REHEARSAL_RUN_S = 3.0  # the rehearsal's full run: long enough to cross log points and a deadline check




class Tee:
    """Write to the terminal and to the log file, flushing both, so a kill loses nothing."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


class Check:
    """The summary of one GPU check and the rules every part follows: a part starts only
    within the budget, a failing part is recorded and the next one runs, and the JSON is
    rewritten atomically whenever anything is added."""

    def __init__(self, out: Path, start: float, budget_s: float, summary: dict[str, Any]) -> None:
        self.out, self.summary, self.start = out, summary, start
        self.deadline = start + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        write_json(self.out / JSON, self.summary)

    def part(self, name: str, fn: Callable[[], Any]) -> Any:
        if self.left() <= 0:
            self.summary[name] = {"ok": False, "skipped": "budget spent"}
            self.save()
            return None
        t = time.perf_counter()
        print(f"== {name} ({self.left():.0f} s of budget left)", flush=True)
        try:
            result = fn()
            self.summary[name] = {"ok": True, "seconds": round(time.perf_counter() - t, 1), "result": result}
        except Exception as e:  # a broken part must not lose the others' measurements, nor its own
            traceback.print_exc()
            kept = {k: v for k, v in self.summary.get(name, {}).items() if k == "partial"}
            self.summary[name] = {"ok": False, "seconds": round(time.perf_counter() - t, 1),
                                  "error": f"{type(e).__name__}: {e}".splitlines()[0], **kept}
            result = None
        self.save()
        print(f"{name}: {'ok' if self.summary[name]['ok'] else 'FAILED'} in {self.summary[name]['seconds']} s",
              flush=True)
        return result


def throughput_part(check: Check, data: str, gpu: bool) -> dict[str, Any]:
    """The benchmark matrix, each row saved into the summary as it is measured."""
    # The rehearsal: the rows whose branches differ (baseline, compiled step, each loader, a
    # fused group of 1 and 2); the eager rows are the bench's own tests' (tests/test_bench.py).
    # One timed step a row: a rate is measured all the same, and each step is one at batch 128.
    rehearsed = [s.tag for s in throughput.MATRIX if s.key or s.loader != "torch" or s.runs in (1, 2)]
    sizes = (["--models", "resnet20,resnet56", "--warmup", "30", "--steps", "100", "--repeats", "5"] if gpu else
             ["--models", "resnet8", "--warmup", "1", "--steps", "1", "--repeats", "1", "--loader-batches", "2",
              "--eval-batch", "100", "--rows", ",".join(rehearsed)])
    budget = max(check.left() - (RESERVE_GPU_S if gpu else RESERVE_CPU_S), 1.0)  # keep time for the later parts
    argv = ["--device", "auto" if gpu else "cpu", "--data", data, "--budget-s", f"{budget:.0f}", *sizes]

    def keep(result: dict[str, Any]) -> None:
        check.summary["throughput"] = {"ok": None, "partial": result}
        check.save()

    found: dict[str, Any] = {}
    throughput.main(argv, on_save=lambda r: (found.update(r), keep(r)))
    failed = [f"{r['model']} {r['name']}: {r['error']}" for r in found["rows"] if "error" in r]
    if failed:
        raise RuntimeError(f"{len(failed)} row(s) failed; first: {failed[0]}")
    return found


def agreement(data: str, device: torch.device, model_name: str, steps: int, precision: str,
              batch_size: int = recipe.BATCH_SIZE, channels_last: bool = True) -> dict[str, Any]:
    """Train two copies of one model on the same batches, eager and compiled; compare.
    channels_last as training uses it on a GPU; the CPU rehearsal's fp64 runs NCHW (torch
    2.13's compiled float64 channels_last step crashes with SIGSEGV when ATen is capped at
    AVX2, this project's stand-in for an AVX2-only machine)."""
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    eager_model = build_model(model_name).to(device, memory_format=layout)
    compiled_model = copy.deepcopy(eager_model)
    precision, _ = resolve_precision(device, precision)
    dtype = PRECISIONS[precision]
    eager_model, compiled_model = eager_model.to(param_dtype(precision)), compiled_model.to(param_dtype(precision))
    where = loaders.Placement(device, tensor_dtype(precision), channels_last=channels_last)
    batches = throughput.endless(loaders.build(loaders.prepare(data), where, batch_size=batch_size).train)
    eager = TrainStep(eager_model, device, dtype, compile=False)
    compiled = TrainStep(compiled_model, device, dtype, compile=True)
    losses = []
    for _ in range(steps):
        x, y = next(batches)
        losses.append((eager(x, y)[0].item(), compiled(x, y)[0].item()))
    worst = max(abs(a - b) / max(abs(a), 1e-8) for a, b in losses)
    params = max((a - b).abs().max().item() for a, b in zip(eager_model.parameters(), compiled_model.parameters(),
                                                           strict=True))
    limit = AGREE_REL.get(precision, AGREE_REL["bf16"])  # fp16, on a GPU without bf16: as bf16
    if worst > limit:
        raise AssertionError(f"compiled and eager losses differ by {worst:.2e} (relative), over {limit}")
    return {"model": model_name, "precision": precision, "channels_last": channels_last, "steps": steps,
            "batch_size": batch_size, "losses": losses,
            "max_rel_loss_diff": worst, "max_abs_param_diff": params, "limit": limit}


def full_run_length(it_s: float | None, first_s: float, eval_s: float, left_s: float,
                    margin_s: float = FULL_RUN_OVERHEAD_S, log_every: int = LOG_EVERY) -> int:
    """Iterations of the ResNet-20 run that fit in `left_s`: the whole 64k schedule when
    the measured rate says so, else the longest prefix that ends on a log point (0: none)."""
    if not it_s:
        return 0
    evals = recipe.ITERS // 2000
    overhead = first_s + evals * eval_s + margin_s
    if overhead + recipe.ITERS / it_s <= left_s:
        return recipe.ITERS
    fits = int(0.9 * (left_s - overhead) * it_s)  # 10% slack: the rate was measured, not promised
    return max(fits // log_every * log_every, 0)


def full_run(check: Check, data: str, model_name: str, run_dir: Path, cap_s: float | None = None,
             margin_s: float = FULL_RUN_OVERHEAD_S, log_every: int = LOG_EVERY, min_iters: int = 0) -> dict[str, Any]:
    """The paper's 64k-iteration run, or its longest prefix that fits the budget (and `cap_s`,
    the rehearsal's bound; the rehearsal also runs at least `min_iters`, so every branch runs
    on any CPU). At the deadline the trainer checkpoints and returns, as on Ctrl-C (a deadline
    the loop reads, not a signal: nothing is sent to the process, so nothing can arrive late)."""
    rows = check.summary.get("throughput", {}).get("result") or check.summary.get("throughput", {}).get("partial")
    fast = next((r for r in (rows or {}).get("rows", []) if r["model"] == model_name and r["name"] == "+ compile"
                 and "it_s" in r), None)
    it_s = fast["it_s"] if fast else None
    # Compilation cost of the run: the cheapest compiled row of this model (a row after the
    # first reuses the compiled graph, as the run will), cold compile time if that is all there is.
    compiled = [r["first_steps_s"] + r.get("eval_first_s", 0.0) for r in (rows or {}).get("rows", [])
                if r["model"] == model_name and r.get("compile") and r["loader"] != "dali" and "it_s" in r]
    first_s = min(compiled, default=0.0)
    test_images = len(loaders.prepare(data).splits.test)
    eval_s = test_images / fast["eval_img_s"] if fast and fast.get("eval_img_s") else 1.0
    seconds = min(check.left(), cap_s or float("inf"))
    iters = max(full_run_length(it_s, first_s, eval_s, seconds, margin_s, log_every), min_iters if it_s else 0)
    plan = {"model": model_name, "measured_it_s": it_s, "planned_iters": iters, "full": iters == recipe.ITERS,
            "budget_left_s": round(check.left(), 1)}
    print(f"full run plan: {plan}", flush=True)
    if iters == 0:
        return {**plan, "skipped": "no measured rate, or no time left for a single log interval"}
    cfg = RunConfig(model=model_name, shortcut="A", data=data, amp=True, channels_last=True, compile=True,
                    log_every=log_every, out=str(run_dir), progress="plain")
    results = train(cfg, stop_at=None if iters == recipe.ITERS else iters,
                    deadline=time.monotonic() + max(seconds, 1.0))
    run = RunDir(run_dir)
    metrics, saved = run.metrics.read(), run.checkpoint_files()
    kept = None
    if results is None and saved:  # unfinished: keep it to resume elsewhere
        kept = f"{model_name}-{saved[0].name}"
        shutil.copyfile(saved[0], check.out / kept)
    step = run.checkpoint().step if saved else 0
    return {**plan, "finished": results is not None, "iters_done": step, "results": results, "metrics": metrics,
            "checkpoint": kept}


def pack_caches(out: Path) -> dict[str, Any]:
    """The compile caches into `out`, whatever the budget says (a few seconds); a failure is
    recorded, not raised: the measurements are what matters."""
    t = time.perf_counter()
    try:
        packed = compile_cache.pack(out, compile_cache.cache_dirs())
    except (OSError, tarfile.TarError) as e:
        packed = {"archive": None, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
    print(f"compile caches: {packed}", flush=True)
    return {**packed, "seconds": round(time.perf_counter() - t, 1)}


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="python scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for gpu_check.json, gpu_check.log and, if needed, a checkpoint")
    p.add_argument("--data", required=True,
                   help="CIFAR-10 copied beside the checkout (no download is tried: the GPU machine is offline)")
    p.add_argument("--budget-s", type=float, help="start nothing after this long (default 420 on a GPU, 150 on CPU)")
    p.add_argument("--rehearse", action="store_true", help="the CPU rehearsal at tiny size (default without a GPU)")
    p.add_argument("--compile-cache", type=Path, metavar="ARCHIVE",
                   help=f"start warm: unpack a {compile_cache.ARCHIVE} an earlier check left into the compile caches")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    gpu = torch.cuda.is_available() and not args.rehearse
    loaders.prepare(args.data)  # bad or missing data: one line and exit 2, before anything is written
    warm = compile_cache.unpack(args.compile_cache, compile_cache.cache_dirs()) if args.compile_cache else None
    args.out.mkdir(parents=True, exist_ok=True)
    device = pick_device("cuda" if gpu else "cpu")
    configure_backends(device)
    summary: dict[str, Any] = {
        "mode": "gpu" if gpu else "cpu rehearsal", "device": device_name(device), "versions": versions(),
        "driver": driver_version() if gpu else None, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "data": loaders.prepare(args.data).source.describe(), "compile_cache_in": warm}
    check = Check(args.out, started, args.budget_s or (420.0 if gpu else 150.0), summary)
    with open(args.out / LOG, "a") as log, contextlib.redirect_stdout(Tee(sys.stdout, log)), \
            contextlib.redirect_stderr(Tee(sys.stderr, log)):
        print(f"{summary['mode']}: {summary['device']} {summary['versions']} driver {summary['driver']}", flush=True)
        check.save()
        model = "resnet20" if gpu else "resnet8"
        check.part("throughput", lambda: throughput_part(check, args.data, gpu))
        for precision in ("bf16", "fp32") if gpu else ("fp64",):
            check.part(f"agreement_{precision}",
                       lambda p=precision: agreement(args.data, device, model, 20 if gpu else 3, p,
                                                     recipe.BATCH_SIZE if gpu else 32, channels_last=gpu))
        with tempfile.TemporaryDirectory(prefix="fastres-gpu-check-") as tmp:
            check.part("full_run", lambda: full_run(check, args.data, model, Path(tmp) / "run",
                                                    cap_s=None if gpu else REHEARSAL_RUN_S,
                                                    margin_s=FULL_RUN_OVERHEAD_S if gpu else 2.0,
                                                    log_every=LOG_EVERY if gpu else 1,
                                                    min_iters=0 if gpu else 10))
        summary["compile_cache"] = pack_caches(args.out)
        check.save()
        failed = [k for k, v in summary.items() if isinstance(v, dict) and v.get("ok") is False and "skipped" not in v]
        print(f"done in {time.monotonic() - check.start:.0f} s; {args.out / JSON}"
              + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
