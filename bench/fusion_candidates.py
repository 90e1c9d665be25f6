"""Which way to fuse N runs into one step, measured: `python bench/fusion_candidates.py`.

Times one training step (forward, loss, backward, SGD update) of N ResNets four ways, in
one process on one device, and writes the figures as JSON:

- sequential: N separate models, one step each (what N runs one after another cost);
- grouped: the HFTA fusion fastres trains with (`fastres.fused`): grouped convolutions,
  BatchNorm over N*C channels, one batched classifier;
- vmap: `torch.func.stack_module_state` + `vmap` over `functional_call`, the members'
  BN running statistics stacked and updated in place under vmap;
- streams (a GPU only): N separate eager steps, each on its own CUDA stream, so the
  device may overlap them.

Rates are aggregate run-iterations per second (N steps of one run each count N).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.throughput import sync  # noqa: E402
from fastres import recipe  # noqa: E402
from fastres.atomic import write_json  # noqa: E402
from fastres.fused import fuse  # noqa: E402
from fastres.models import ModelSpec  # noqa: E402
from fastres.optim import make_optimizer  # noqa: E402
from fastres.runtime import device_name, pick_device, versions  # noqa: E402


def sequential(models: list[torch.nn.Module], device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    opts = [make_optimizer(m, device, None) for m in models]

    def step(x: torch.Tensor, y: torch.Tensor) -> None:  # x: (N, B, 3, H, W), y: (N, B)
        for m, opt, xi, yi in zip(models, opts, x, y, strict=True):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(xi), yi).backward()
            opt.step()
    return step


def grouped(models: list[torch.nn.Module], device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    model = fuse(models)
    opt = make_optimizer(model, device, None)
    runs = len(models)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        xb = x.permute(1, 0, 2, 3, 4).flatten(1, 2)  # (B, N*3, H, W)
        logits = model(xb).unflatten(1, (runs, -1))
        loss = F.cross_entropy(logits.flatten(0, 1), y.t().flatten(), reduction="none").view(-1, runs).mean(0).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def vmapped(models: list[torch.nn.Module], device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    opt = torch.optim.SGD(list(params.values()), lr=recipe.LR, momentum=recipe.MOMENTUM,
                          weight_decay=recipe.WEIGHT_DECAY, foreach=True)

    def one(p: dict, b: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(base, (p, b), (x,)), y)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        torch.vmap(one)(params, buffers, x, y).sum().backward()
        opt.step()
    return step


def streams(models: list[torch.nn.Module], device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    if device.type != "cuda":
        raise NotImplementedError("CUDA streams need a GPU")
    opts = [make_optimizer(m, device, None) for m in models]
    side = [torch.cuda.Stream(device) for _ in models]

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        main = torch.cuda.current_stream(device)
        for m, opt, stream, xi, yi in zip(models, opts, side, x, y, strict=True):
            stream.wait_stream(main)  # the batch is ready before the side stream reads it
            with torch.cuda.stream(stream):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(m(xi), yi).backward()
                opt.step()
        for stream in side:
            main.wait_stream(stream)
    return step


CANDIDATES = {"sequential": sequential, "grouped": grouped, "vmap": vmapped, "streams": streams}


def measure(step: Callable, x: torch.Tensor, y: torch.Tensor, device: torch.device, iters: int,
            repeats: int) -> list[float]:
    for _ in range(3):  # warm-up
        step(x, y)
    sync(device)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            step(x, y)
        sync(device)  # note: a host sync, so the timing covers the device work
        rates.append(iters * len(x) / (time.perf_counter() - t0))
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--runs", default="1,2,4,8")
    p.add_argument("--batch-size", type=int, default=recipe.BATCH_SIZE)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("bench/results/fusion_candidates.json"))
    args = p.parse_args(argv)
    device = pick_device(args.device)
    rows = []
    for name in args.models.split(","):
        spec = ModelSpec.parse(name)
        for runs in (int(r) for r in args.runs.split(",")):
            x = torch.randn(runs, args.batch_size, 3, 32, 32, device=device)
            y = torch.randint(0, 10, (runs, args.batch_size), device=device)
            for cand, make in CANDIDATES.items():
                models = []
                for seed in range(runs):
                    torch.manual_seed(seed)
                    models.append(spec.build().to(device))
                row = {"model": name, "runs": runs, "candidate": cand}
                try:
                    rates = measure(make(models, device), x, y, device, args.iters, args.repeats)
                    row.update(run_it_s=round(statistics.median(rates), 2), spread=[round(r, 2) for r in rates])
                except NotImplementedError as e:
                    row["skipped"] = str(e)
                except Exception as e:  # a candidate that cannot run is a result too
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_json(args.out, {"device": device_name(device), "versions": versions(),
                                      "batch_size": args.batch_size, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
