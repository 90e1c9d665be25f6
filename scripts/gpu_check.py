"""The GPU check, one prepared command: `python scripts/gpu_check.py OUT_DIR --data DIR`.

Made for a GPU lent briefly, offline, with a hard limit per command: everything it measures
is in OUT_DIR/gpu_check.json (rewritten atomically after every benchmark row and every
part) and OUT_DIR/gpu_check.log, so a kill at any moment keeps what was measured. The parts,
most valuable first, each started only while the budget lasts, each budgeted from what the
parts before it measured:

1. smoke: ResNet-20's compiled step at batch 128, eager against compiled for 5 steps, then
   10 steps under torch.profiler (kernels, CPU and GPU ms per step); it fails, in the JSON
   and the exit status, on any CUDA-graph skip, graph break or recompile. Its cold compile
   is the one every later ResNet-20 step reuses;
2. ResNet-20's benchmark rows: the full fastres step, then the baseline;
3. the 64,000-iteration ResNet-20 run, planned from part 2's warm it/s, warm compile and
   measured evaluation time, else its longest prefix that fits (its checkpoint kept);
4. ResNet-56's full step, then its baseline;
5. ResNet-20 x8 fused, channels_last and NCHW, against x1: which layout the fused step wants;
6. the whole step as one CUDA graph (GPU only), the ablation rows (the full step batch by
   batch, with the loss outside the graph, and with both; eager, channels_last, AMP, host
   loader), the loaders alone, and agreement of eager and compiled steps on ResNet-8 (fp32;
   the rehearsal's in fp64);
then, whatever the budget: the compile caches packed into OUT_DIR/compile_cache.tar.gz if
they pack under 16 MiB, for the next check to start warm (`--compile-cache`, docs/gpu-check.md).
DALI is not in the check (bench/throughput.py has its rows, for a machine that has it).

Without a GPU (or with --rehearse) the same code runs at tiny size on the CPU: every branch
the GPU run takes except CUDA graphs, fused CUDA SGD and pinned copies, and with torch.compile's
"aot_eager_decomp_partition" backend (REHEARSAL_BACKEND) in place of Inductor: Dynamo and
AOTAutograd run as on the GPU, with Inductor's decompositions and partitioner, and their
counters are read; Inductor's fusion and code generation are skipped (C++ on a CPU, tens of
seconds a graph; what a GPU would run is Triton).
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
from fastres.errors import DataError  # noqa: E402
from fastres.models import build_model  # noqa: E402
from fastres.rundir import RunDir  # noqa: E402
from fastres.runtime import (  # noqa: E402
    PRECISIONS,
    configure_backends,
    device_name,
    param_dtype,
    pick_device,
    requested_precision,
    resolve_precision,
    tensor_dtype,
    versions,
)
from fastres.step import TrainStep, compiler_backend  # noqa: E402
from fastres.train import train  # noqa: E402
from scripts import compile_cache  # noqa: E402

JSON, LOG = "gpu_check.json", "gpu_check.log"
# Eager and compiled trajectories drift apart step by step (kernel choice, fusion, rounding);
# over the steps compared their losses must stay this close (relative), in fp32 and in bf16
# (measured on CPU, 3 steps of ResNet-8: 1.4e-5 in fp32, 2.5e-4 in bf16; 5 steps of the
# rehearsal's smoke test, fp32: 5e-5). Those bounds were measured, so they hold on a GPU
# check only: on a CPU, rounding differs between processors, and the rehearsal records its
# fp32/bf16 agreement without judging it. Its judged agreement is in fp64, where the same
# drift starts from float64's rounding (1.1e-16 instead of fp32's 6e-8) and 3 steps amplify
# it far less than the 2e6 that 30 fused steps were measured to (tests/test_fused.py): below
# 1e-9 on any processor.
AGREE_REL = {"fp32": 1e-2, "bf16": 5e-2, "fp64": 1e-9}
SMOKE_STEPS, PROFILE_STEPS = 5, 10
# Dynamo graphs one compiled model in train mode makes: its forward, whole (AOTAutograd's
# backward is not a Dynamo graph). More is a graph break or a recompile.
SMOKE_GRAPHS = 1
# What the full run needs beyond its steps and evaluations: checkpoints, the trainer's start.
# Measured figures replace the rest (compile, evaluation) where present.
FULL_RUN_OVERHEAD_S = 30.0
LOG_EVERY = 100
# Before any benchmark row has been measured, the time one is assumed to take: a cold
# ResNet-56 compile on a GPU is tens of seconds. Once rows are measured, the longest is used.
FALLBACK_ROW_S = 60.0
REHEARSAL_BACKEND = "aot_eager_decomp_partition"  # the rehearsal's compiler (see the module's docstring)
# The rehearsal's training batch: its steps check that each part runs and fills its fields, which
# no batch size changes, and a step's cost is linear in it (fused x2 at 128 is 256 images a step)
REHEARSAL_BATCH = 32
REHEARSAL_NOTE = ("a CPU rehearsal: ResNet-8 in every model's place (the parts and figures keep the GPU's names), "
                  f"fused x2 for x8, batches of {REHEARSAL_BATCH}, one timed step a row: it checks that every part "
                  "runs and every field is filled; its speeds are not measurements")
# Part 6's rows: the whole-step graph first, then the full step with a part undone (what the
# batches made in slabs and the loss compiled with the model each gain), then the older ablations
ABLATION_ROWS = "whole-step,per-batch,loss-outside,neither,eager,channels-last,amp,host"
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

    def isatty(self) -> bool:
        """Never a terminal: a log file is one of the streams (plain progress lines, no bar)."""
        return False


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

    def part(self, name: str, fn: Callable[[], Any], needs_s: float = 0.0) -> Any:
        """Run part `name`, unless less than `needs_s` seconds (an estimate from what earlier
        parts measured) are left of the budget: a part started near the end would be killed
        with the command, and take the compile caches' packing with it."""
        if self.left() <= max(needs_s, 0.0):
            why = "budget spent" if self.left() <= 0 else f"needs about {needs_s:.0f} s, {self.left():.0f} s left"
            self.summary[name] = {"ok": False, "skipped": why}
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


def cold_compile_s(summary: dict[str, Any]) -> float:
    """What a part that compiles a new model cold (the agreement parts: ResNet-8, smaller
    than the smoke test's ResNet-20) is given to need: the smoke test's first step, its cold
    compile; FALLBACK_ROW_S when the smoke test measured none."""
    return measured(summary.get("smoke", {})).get("first_step_s") or FALLBACK_ROW_S


def longest_row_s(summary: dict[str, Any]) -> float:
    """The longest benchmark row measured so far (FALLBACK_ROW_S before any): what a part
    keeps in hand so that its last row, once started, still ends within the budget."""
    seconds = [r["seconds"] for part in summary.values() if isinstance(part, dict)
               for r in bench_rows(part) if "it_s" in r]
    return max(seconds, default=FALLBACK_ROW_S)


def measured(part: dict[str, Any]) -> dict[str, Any]:
    """What a part measured, finished or partial ({} when nothing)."""
    found = part.get("result") or part.get("partial")
    return found if isinstance(found, dict) else {}


def bench_rows(part: dict[str, Any]) -> list[dict[str, Any]]:
    """A bench part's rows, finished or partial (empty for any other part)."""
    return measured(part).get("rows", [])


def bench_part(check: Check, name: str, data: str, gpu: bool, models: str, rows: str,
               loaders_alone: str = "") -> dict[str, Any]:
    """Rows of the benchmark matrix (bench/throughput.py), each saved into the summary as it
    is measured; no row starts unless the longest measured so far would still end in time."""
    # The rehearsal: one timed step a row and one profiled (a rate is measured all the same),
    # in batches of REHEARSAL_BATCH, the evaluation on 2 batches of 100.
    sizes = (["--warmup", "30", "--steps", "100", "--repeats", "5", "--profile-steps", str(PROFILE_STEPS)] if gpu
             else ["--warmup", "1", "--steps", "1", "--repeats", "1", "--profile-steps", "1", "--loader-batches", "2",
                   "--batch-size", str(REHEARSAL_BATCH), "--eval-batch", "100", "--eval-batches", "2"])
    budget = max(check.left() - longest_row_s(check.summary), 0.0)
    argv = ["--device", "auto" if gpu else "cpu", "--data", data, "--budget-s", f"{budget:.0f}",
            "--models", models, "--rows", rows, "--loaders", loaders_alone, *sizes]

    def keep(result: dict[str, Any]) -> None:
        check.summary[name] = {"ok": None, "partial": result}
        check.save()

    found: dict[str, Any] = {}
    throughput.main(argv, on_save=lambda r: (found.update(r), keep(r)))
    failed = [f"{r['model']} {r['name']}: {r['error']}" for r in found["rows"] if "error" in r]
    if failed:
        raise RuntimeError(f"{len(failed)} row(s) failed; first: {failed[0]}")
    return found


class Pair:
    """Two copies of one model on the same batches, eager and compiled, as training builds
    them (channels_last by default, as training uses it)."""

    def __init__(self, data: str, device: torch.device, model_name: str, precision: str,
                 batch_size: int = recipe.BATCH_SIZE, channels_last: bool = True, whole_step: bool = False) -> None:
        torch.manual_seed(0)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.device = device
        self.precision, _ = resolve_precision(device, precision)
        self.eager_model = build_model(model_name).to(device, memory_format=layout).to(param_dtype(self.precision))
        self.compiled_model = copy.deepcopy(self.eager_model)
        dtype = PRECISIONS[self.precision]
        where = loaders.Placement(device, tensor_dtype(self.precision), channels_last=channels_last)
        self.batches = throughput.endless(loaders.build(loaders.prepare(data), where, batch_size=batch_size).train)
        self.eager = TrainStep(self.eager_model, device, dtype, compile=False)
        self.compiled = TrainStep(self.compiled_model, device, dtype, compile=True, whole_step=whole_step)
        self.about = {"model": model_name, "precision": self.precision, "channels_last": channels_last,
                      "batch_size": batch_size}

    def compare(self, steps: int, lr_drop_at: int | None = None) -> dict[str, Any]:
        """Train both for `steps`; their losses must agree within AGREE_REL. `lr_drop_at`: the
        step from which both train at a tenth of the lr (a schedule's milestone)."""
        losses = []
        for k in range(steps):
            if k == lr_drop_at:
                for step in (self.eager, self.compiled):
                    step.set_lr(recipe.LR / recipe.LR_DROP)
            x, y = next(self.batches)
            losses.append((self.eager(x, y)[0].item(), self.compiled(x, y)[0].item()))
        worst = max(abs(a - b) / max(abs(a), 1e-8) for a, b in losses)
        params = max((a - b).abs().max().item() for a, b in zip(self.eager_model.parameters(),
                                                               self.compiled_model.parameters(), strict=True))
        judged = self.device.type == "cuda" or self.precision == "fp64"  # see AGREE_REL
        limit = AGREE_REL.get(self.precision, AGREE_REL["bf16"]) if judged else None  # fp16: as bf16
        if limit is not None and worst > limit:
            raise AssertionError(f"compiled and eager losses differ by {worst:.2e} (relative), over {limit}")
        return {**self.about, "steps": steps, "losses": losses, "max_rel_loss_diff": worst,
                "max_abs_param_diff": params, "limit": limit}


def agreement(data: str, device: torch.device, model_name: str, steps: int, precision: str,
              batch_size: int = recipe.BATCH_SIZE, channels_last: bool = True) -> dict[str, Any]:
    """Eager and compiled training steps on the same batches, compared."""
    return Pair(data, device, model_name, precision, batch_size, channels_last).compare(steps)


def counted() -> dict[str, dict[str, int]]:
    """Dynamo's and Inductor's counters now (torch._dynamo.utils.counters), as plain dicts."""
    from torch._dynamo.utils import counters

    return {group: dict(values) for group, values in counters.items()}


def unique_graphs(counters: dict[str, dict[str, int]]) -> int:
    """The Dynamo graphs made so far, by `counted()`'s counters."""
    return counters.get("stats", {}).get("unique_graphs", 0)


def smoke_verdict(counters: dict[str, dict[str, int]], graphs: int = SMOKE_GRAPHS) -> list[str]:
    """What the counters of one compiled model's steps say went wrong (empty: nothing): a
    CUDA-graph skip (its kernels then run one by one, launch-bound), a graph break (the
    step split in pieces with Python between them), more graphs than `graphs` (recompiles)."""
    problems = []
    skips = counters.get("inductor", {}).get("cudagraph_skips", 0)
    if skips:
        problems.append(f"{skips} CUDA-graph skip(s)")
    breaks = counters.get("graph_break", {})
    if breaks:
        problems.append(f"{sum(breaks.values())} graph break(s): {'; '.join(breaks)}"[:500])
    made = unique_graphs(counters)
    if made > graphs:
        problems.append(f"{made} Dynamo graphs, {graphs} expected: a recompile")
    return problems


def smoke(check: Check, data: str, device: torch.device, model_name: str, precision: str,
          batch_size: int = recipe.BATCH_SIZE) -> dict[str, Any]:
    """The compiled step in the training configuration (at batch 128 on a GPU): eager against
    compiled for SMOKE_STEPS steps, then PROFILE_STEPS compiled steps under torch.profiler (2
    in the CPU rehearsal); loud on any CUDA-graph skip, graph break or recompile. Its cold compile
    is the one the later ResNet-20 rows and the full run reuse (same process, same
    compile_model)."""
    from torch._dynamo.utils import counters

    counters.clear()
    pair = Pair(data, device, model_name, precision, batch_size)
    t = time.perf_counter()
    first = pair.compare(1)  # the cold compile (and graph capture) is in this first step
    cold_s = time.perf_counter() - t
    rest = pair.compare(SMOKE_STEPS - 1)

    def steps(n: int) -> None:
        for _ in range(n):
            pair.compiled(*next(pair.batches))
    profiled = throughput.profile_steps(steps, device, PROFILE_STEPS if device.type == "cuda" else 2)  # 2: rehearsed
    seen = counted()
    problems = smoke_verdict(seen)
    result = {**pair.about, "steps": SMOKE_STEPS, "first_step_s": round(cold_s, 2),
              "max_rel_loss_diff": max(first["max_rel_loss_diff"], rest["max_rel_loss_diff"]), "limit": first["limit"],
              "losses": first["losses"] + rest["losses"], "profile": profiled,
              "counters": {"cudagraph_skips": seen.get("inductor", {}).get("cudagraph_skips", 0),
                           "graph_breaks": seen.get("graph_break", {}),
                           "unique_graphs": unique_graphs(seen),
                           "frames": seen.get("frames", {}), "expected_graphs": SMOKE_GRAPHS},
              "problems": problems}
    return judged(check, result)


def judged(check: Check, result: dict[str, Any]) -> dict[str, Any]:
    """The smoke test's result, or, when its verdict names problems, a failure that keeps it
    (the part then reads failed in the JSON and the exit status)."""
    if result["problems"]:
        check.summary["smoke"] = {"ok": None, "partial": result}
        raise AssertionError(f"smoke test: {'; '.join(result['problems'])}")
    return result


def fused_layout(rows: list[dict[str, Any]], tag: str = "fused-x8") -> dict[str, Any]:
    """Which layout the fused step is faster in: the `tag` row (channels_last) against its
    NCHW twin, by it/s; null figures, with the reason, when either was not measured."""
    found = {r["tag"]: r for r in rows if "it_s" in r}
    cl, nchw = found.get(tag), found.get(f"{tag}-nchw")
    if cl is None or nchw is None:
        return {"faster": None, "ratio": None, "reason": f"{tag} and {tag}-nchw not both measured"}
    fast, slow = (("channels_last", cl), ("nchw", nchw)) if cl["it_s"] >= nchw["it_s"] else \
        (("nchw", nchw), ("channels_last", cl))
    return {"faster": fast[0], "ratio": fast[1]["it_s"] / slow[1]["it_s"],
            "it_s": {"channels_last": cl["it_s"], "nchw": nchw["it_s"]}}


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
             margin_s: float = FULL_RUN_OVERHEAD_S, log_every: int = LOG_EVERY, min_iters: int = 0,
             batch_size: int = recipe.BATCH_SIZE) -> dict[str, Any]:
    """The paper's 64k-iteration run, or its longest prefix that fits the budget (and `cap_s`,
    the rehearsal's bound; the rehearsal also runs at least `min_iters`, so every branch runs
    on any CPU). At the deadline the trainer checkpoints and returns, as on Ctrl-C (a deadline
    the loop reads, not a signal: nothing is sent to the process, so nothing can arrive late)."""
    fast = row_of(check.summary, "resnet20", "compile")  # part 2's compiled row ({}: not measured)
    it_s = fast["it_s"] if fast else None  # warm: the median of the timed repeats
    # The run's compile: that row's first steps, which reused the smoke test's graph as the run
    # will (warm), and its first evaluation.
    first_s = fast["first_steps_s"] + fast.get("eval_first_s", 0.0) if fast else 0.0
    test_images = len(loaders.prepare(data).splits.test)
    # unmeasured, 1 s: an eager pass over 10,000 images on a GPU, in batches of 1000
    eval_s = test_images / fast["eval_img_s"] if fast and fast.get("eval_img_s") else 1.0
    seconds = min(check.left(), cap_s or float("inf"))
    iters = max(full_run_length(it_s, first_s, eval_s, seconds, margin_s, log_every), min_iters if it_s else 0)
    plan = {"model": model_name, "batch_size": batch_size, "measured_it_s": it_s, "warm_first_s": first_s,
            "eval_s": eval_s, "planned_iters": iters, "full": iters == recipe.ITERS,
            "budget_left_s": round(check.left(), 1)}
    print(f"full run plan: {plan}", flush=True)
    if iters == 0:
        return {**plan, "skipped": "no measured rate, or no time left for a single log interval"}
    cfg = RunConfig(model=model_name, shortcut="A", data=data, amp=True, channels_last=True, compile=True,
                    batch_size=batch_size, log_every=log_every, out=str(run_dir), progress="plain")
    graphs = unique_graphs(counted())
    t = time.perf_counter()
    results = train(cfg, stop_at=None if iters == recipe.ITERS else iters,
                    deadline=time.monotonic() + max(seconds, 1.0))
    seconds_taken = time.perf_counter() - t
    run = RunDir(run_dir)
    metrics, saved = run.metrics.read(), run.checkpoint_files()
    kept = None
    if results is None and saved:  # unfinished: keep its checkpoint (the run's folder is temporary)
        kept = f"{model_name}-{saved[0].name}"
        shutil.copyfile(saved[0], check.out / kept)
        print(f"the run's folder above is temporary and goes when the check ends; its last checkpoint is "
              f"{check.out / kept} (python -m fastres.evaluate {check.out / kept} --data DIR, DIR the data "
              "where it is evaluated)", flush=True)
    step = run.checkpoint().step if saved else 0
    return {**plan, "finished": results is not None, "iters_done": step, "seconds": round(seconds_taken, 1),
            "it_s": step / seconds_taken if seconds_taken else None,
            "new_graphs": unique_graphs(counted()) - graphs,  # 0: part 2's graph reused
            "final_test_error": results.get("test_error") if results else None,
            "results": results, "metrics": metrics, "checkpoint": kept}


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
    p.add_argument("--budget-s", type=float, help="start nothing after this long (default 420 on a GPU, 300 on CPU)")
    p.add_argument("--rehearse", action="store_true", help="the CPU rehearsal at tiny size (default without a GPU)")
    p.add_argument("--compile-cache", type=Path, metavar="ARCHIVE",
                   help=f"start warm: unpack a {compile_cache.ARCHIVE} an earlier check left into the compile caches")
    return p.parse_args(argv)


def row_of(summary: dict[str, Any], part: str, tag: str) -> dict[str, Any]:
    """One measured row of a bench part, or {} (not run, skipped, failed)."""
    return next((r for r in bench_rows(summary.get(part, {})) if r["tag"] == tag and "it_s" in r), {})


def figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The headline figures in one place, each null where its part did not measure it."""
    smoke_part = summary.get("smoke", {})
    smoke_found = measured(smoke_part)
    profiled = smoke_found.get("profile", {})
    full = (summary.get("full_run") or {}).get("result") or {}
    it_s = {f"{part} {tag}": row_of(summary, part, tag).get("it_s")
            for part, tag in (("resnet20", "compile"), ("resnet20", "baseline"), ("resnet56", "compile"),
                              ("resnet56", "baseline"), ("fused", "fused-x1"), ("fused", "fused-x8"),
                              ("fused", "fused-x8-nchw"), ("ablation", "whole-step"), ("ablation", "per-batch"),
                              ("ablation", "loss-outside"), ("ablation", "neither"))}
    profile_keys = ("kernels_per_step", "cpu_ms_per_step", "gpu_ms_per_step", "cpu_ops_per_step")
    targeted = (("resnet20", "compile"), ("resnet56", "compile"), ("fused", "fused-x8"), ("fused", "fused-x8-nchw"))
    return {"smoke_ok": smoke_part.get("ok"), "smoke_problems": smoke_found.get("problems"),
            "smoke_counters": smoke_found.get("counters"), **{k: profiled.get(k) for k in profile_keys},
            "cold_first_step_s": smoke_found.get("first_step_s"),  # the smoke test's: the cold compile
            "warm_first_steps_s": row_of(summary, "resnet20", "compile").get("first_steps_s"),  # its graph reused
            "it_s": it_s,
            "baseline_ratio": {p: row_of(summary, p, "compile").get("speedup") for p in ("resnet20", "resnet56")},
            "fused_speedup": {tag: row_of(summary, "fused", tag).get("fused_speedup")  # over x1, in run-iterations
                              for tag in ("fused-x8", "fused-x8-nchw")},
            "meets_target": {f"{part} {tag}": row_of(summary, part, tag).get("meets_target") for part, tag in targeted},
            "full_run_iters": full.get("iters_done"), "full_run_final_test_error": full.get("final_test_error"),
            "full_run_new_graphs": full.get("new_graphs"), "fused_layout": summary.get("fused_layout"),
            "whole_step_agrees": agrees(summary.get("agreement_whole_step"))}


def agrees(part: dict[str, Any] | None) -> bool | None:
    """An agreement part's verdict: None when it did not run (absent, or skipped for time),
    else whether it passed."""
    if not part or "skipped" in part:
        return None
    return part.get("ok")


def run_parts(check: Check, data: str, device: torch.device, gpu: bool) -> None:
    """Parts 1-6, most valuable first (see the module's docstring), each named in the JSON
    as on a GPU. The rehearsal runs ResNet-8 in every model's place, fuses 2 runs instead of 8
    (x8 takes minutes on a CPU), and trains in batches of REHEARSAL_BATCH instead of 128."""
    small, deep = ("resnet20", "resnet56") if gpu else ("resnet8", "resnet8")
    batch = recipe.BATCH_SIZE if gpu else REHEARSAL_BATCH
    amp = requested_precision(True, "auto")  # the training configuration: bf16 where native
    check.part("smoke", lambda: smoke(check, data, device, small, amp, batch))
    check.part("resnet20", lambda: bench_part(check, "resnet20", data, gpu, small, "compile,baseline"))
    with tempfile.TemporaryDirectory(prefix="fastres-gpu-check-") as tmp:
        check.part("full_run", lambda: full_run(check, data, small, Path(tmp) / "run",
                                                cap_s=None if gpu else REHEARSAL_RUN_S,
                                                margin_s=FULL_RUN_OVERHEAD_S if gpu else 2.0,
                                                log_every=LOG_EVERY if gpu else 1, min_iters=0 if gpu else 10,
                                                batch_size=batch))
    check.part("resnet56", lambda: bench_part(check, "resnet56", data, gpu, deep, "compile,baseline"))
    fused_rows = "fused-x1,fused-x8,fused-x8-nchw" if gpu else "fused-x1,fused-x2"
    check.part("fused", lambda: bench_part(check, "fused", data, gpu, small, fused_rows))
    check.summary["fused_layout"] = fused_layout(bench_rows(check.summary["fused"]))
    # first the whole step as one CUDA graph: that it computes what the eager step does, across
    # an lr drop after its capture (3 warm-up steps), then its speed against part 2's compiled
    # row (CUDA only: the rehearsal's bench records that row skipped)
    if gpu:
        check.part("agreement_whole_step", lambda: Pair(data, device, "resnet8", "fp32", whole_step=True)
                   .compare(12, lr_drop_at=6), needs_s=cold_compile_s(check.summary))
    check.part("ablation", lambda: bench_part(check, "ablation", data, gpu, small,
                                              ABLATION_ROWS, loaders_alone="baseline,eager,amp,per-batch,host"))
    # fp32 on a GPU; the rehearsal's in fp64 and NCHW (torch 2.13's compiled float64
    # channels_last step crashes with SIGSEGV when ATen is capped at AVX2), judged to AGREE_REL
    agree = "fp32" if gpu else "fp64"
    check.part(f"agreement_{agree}", lambda: agreement(data, device, "resnet8", 20 if gpu else 3, agree,
                                                       batch_size=batch,
                                                       channels_last=gpu), needs_s=cold_compile_s(check.summary))
    check.summary["figures"] = figures(check.summary)


def failed_parts(summary: dict[str, Any]) -> list[str]:
    """The parts that ran and failed (a part skipped for time has not failed): exit status 1."""
    return [k for k, v in summary.items() if isinstance(v, dict) and v.get("ok") is False and "skipped" not in v]


def check_batch(train_images: int, batch_size: int) -> None:
    """Every part trains in batches of `batch_size`: refuse data that cannot fill one."""
    if train_images < batch_size:
        raise DataError(f"--data: {train_images} training images make no batch of {batch_size}; "
                        f"the check needs at least {batch_size}")


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    gpu = torch.cuda.is_available() and not args.rehearse
    # bad or missing data, or too few images for a batch: one line and exit 2, before anything is written
    train_images = len(loaders.prepare(args.data, progress="plain").splits.train)  # decoding (once) is announced
    check_batch(train_images, recipe.BATCH_SIZE if gpu else REHEARSAL_BATCH)
    warm = compile_cache.unpack(args.compile_cache, compile_cache.cache_dirs()) if args.compile_cache else None
    args.out.mkdir(parents=True, exist_ok=True)
    device = pick_device("cuda" if gpu else "cpu")
    configure_backends(device)
    if gpu:  # the profiler's CUDA side set up before any graph is captured (pytorch#75504)
        torch.profiler._utils._init_for_cuda_graphs()
    summary: dict[str, Any] = {
        "mode": "gpu" if gpu else "cpu rehearsal", "device": device_name(device), "versions": versions(),
        "driver": driver_version() if gpu else None, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "data": loaders.prepare(args.data).source.describe(), "compile_cache_in": warm,
        "compiler": "inductor" if gpu else REHEARSAL_BACKEND,
        "note": None if gpu else REHEARSAL_NOTE}
    check = Check(args.out, started, args.budget_s or (420.0 if gpu else 300.0), summary)
    with open(args.out / LOG, "a") as log, contextlib.redirect_stdout(Tee(sys.stdout, log)), \
            contextlib.redirect_stderr(Tee(sys.stderr, log)):
        print(f"{summary['mode']}: {summary['device']} {summary['versions']} driver {summary['driver']}", flush=True)
        check.save()
        with contextlib.nullcontext() if gpu else compiler_backend(REHEARSAL_BACKEND):
            run_parts(check, args.data, device, gpu)
        summary["compile_cache"] = pack_caches(args.out)
        check.save()
        failed = failed_parts(summary)
        print(f"done in {time.monotonic() - check.start:.0f} s; {args.out / JSON}"
              + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
