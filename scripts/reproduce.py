"""Reproduce the paper's CIFAR-10 table and Fig. 6 from real runs, in one command.

    python scripts/reproduce.py                       # the paper's 64k schedule, 1 seed each
    python scripts/reproduce.py --seeds 5 --amp --channels-last --compile
    python scripts/reproduce.py --scale 0.05 --runs resnet20,resnet56,plain20,plain56   # quick
    python scripts/reproduce.py --runs resnet20 --val-split 5000 --sweep lr=0.05,0.1,0.2

Each run has its own directory under `OUT/runs/`; finished runs are skipped and stopped
ones resume (a fused group as a group), so the command can simply be run again after an
interruption. On a GPU the seeds of each model train fused into one step (`--fuse`,
`--group-size`); on a CPU, where fusing measured slower, one after another. The report
(`OUT/report.md`, `.csv`, `.json` and figures) is redrawn from all finished runs at the end;
`python -m fastres.report OUT/runs --out OUT` redraws it alone. With `--sweep`, each
model's sweep is also reported on its own (`OUT/<model>-sweep/sweep.md`), its setting chosen
on the validation error alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fastres import group, recipe, report  # noqa: E402
from fastres.cli import Parser, run_main  # noqa: E402
from fastres.config import (  # noqa: E402
    FUSE,
    RunConfig,
    parse_sweeps,
    recorded,
    resume_overrides,
    run_name,
    sweep_record,
    sweep_runs,
    validate,
)
from fastres.data.dataset import DATASETS  # noqa: E402
from fastres.errors import UsageError  # noqa: E402
from fastres.models import ModelSpec  # noqa: E402
from fastres.rundir import RunDir  # noqa: E402
from fastres.runtime import pick_device  # noqa: E402
from fastres.train import resume, train_group  # noqa: E402

DEFAULT_RUNS = "resnet20,resnet32,resnet44,resnet56,resnet110,resnet56:B,plain20,plain32,plain44,plain56"


def run_configs(args: argparse.Namespace) -> list[RunConfig]:
    """One config per (model, shortcut, seed), and per setting of --sweep, model after
    model, the paper's schedule scaled by --scale (a swept schedule is taken as given)."""
    def scaled(n: int) -> int:
        return max(1, round(n * args.scale))

    sweeps = parse_sweeps(args.sweep or [], args)
    if sweeps and not args.val_split:
        raise UsageError("--sweep needs --val-split N: a sweep is chosen on validation, never on test")
    iters = scaled(recipe.ITERS)
    milestones = tuple(scaled(m) for m in recipe.MILESTONES)
    configs = []
    data = args.data and os.path.abspath(args.data)  # saved absolute: a resume works from any folder
    for text in args.runs.split(","):
        try:
            spec = ModelSpec.parse(text)
        except ValueError as e:
            raise UsageError(f"--runs: {e}") from None
        for setting, swept, seed in sweep_runs(sweeps, list(range(args.seeds))):
            cfg = RunConfig(**{
                "model": spec.name, "shortcut": spec.shortcut, "iters": iters, "milestones": milestones,
                "warmup_iters": round(recipe.default_warmup_iters(spec.depth) * args.scale), "seed": seed, "data": data,
                "val_split": args.val_split, "val_seed": args.val_seed, "loader": args.loader, "device": args.device,
                "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile,
                "eval_every": max(1, iters // args.curve_points), "log_every": max(1, iters // 200),
                "checkpoint_every": max(1, iters // 20),
                "out": str(args.out / "runs" / run_name(spec, args.dataset, seed, swept)), "dataset": args.dataset,
                "progress": args.progress, "extra": {"reproduce_scale": args.scale, **sweep_record(sweeps)},
                **setting})
            configs.append(validate(cfg))
    return configs


def build_parser() -> Parser:
    p = Parser(prog="python scripts/reproduce.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated models; resnetN:B for option B")
    p.add_argument("--seeds", type=int, default=1, help="runs per model, seeds 0..N-1")
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2", help="also one run per value (as "
                   "python -m fastres.train --sweep; needs --val-split), each model's sweep reported on its own")
    p.add_argument("--val-split", type=int, default=0, help="hold out this many training images as validation")
    p.add_argument("--val-seed", type=int, default=0, help="which images --val-split holds out (default 0)")
    p.add_argument("--fuse", default="auto", choices=FUSE, help="train each model's seeds as one fused step: auto "
                   "(default: on a GPU; one after another on a CPU, where fusing measured slower), on, or off")
    p.add_argument("--group-size", type=int, help="at most this many seeds in one fused group (default: all)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply iterations and milestones (quick runs)")
    p.add_argument("--out", type=Path, default=Path("results/reproduce"))
    p.add_argument("--dataset", default="cifar10", choices=tuple(DATASETS))
    p.add_argument("--data")
    p.add_argument("--loader", default="torch", choices=("torch", "dali"))
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--progress", default="auto")
    p.add_argument("--curve-points", type=int, default=40, help="test evaluations per run, for the figures")
    return p


def same_run(saved: RunConfig, cfg: RunConfig) -> bool:
    """Whether a saved run is the one asked for (device, progress, the resolved precision
    and the recorded thread count may differ: they are what the run found, not what was asked)."""
    keep = (*resume_overrides(), *recorded())
    return dataclasses.replace(saved, **{k: getattr(cfg, k) for k in keep}) == cfg


def train_model(args: argparse.Namespace, cfgs: list[RunConfig], device_type: str) -> bool:
    """Train the seeds of one model: finished runs are skipped, stopped ones resume with
    the group they were trained in (a run whose results a kill took gets them back), and
    the rest train in fused groups. False when stopped."""
    wanted = {os.path.normpath(c.out): c for c in cfgs}
    pending, resumed = [], set()
    for cfg in cfgs:
        run_dir = RunDir(cfg.out)
        if run_dir.results() is not None:
            print(f"done already: {run_dir.path}")
        elif not run_dir.checkpoint_files():
            pending.append(cfg)
        elif os.path.normpath(cfg.out) not in resumed:
            def check(saved: list[RunConfig], step: int) -> None:
                names = [os.path.normpath(c.out) for c in saved]
                for c, name in zip(saved, names, strict=True):
                    if name not in wanted or not same_run(c, wanted[name]):
                        raise UsageError(f"{c.out} holds a run with another configuration; move it away or choose "
                                         "another --out")
                resumed.update(names)
                print(f"resuming: {', '.join(names)} at iteration {step}")
            if resume([cfg.out], check=check) is None:
                return False
    groups, note = group.plan(pending, args.fuse, device_type, max_size=args.group_size)
    if note:
        print(f"fastres: {cfgs[0].model}: {note}", file=sys.stderr)
    return all(train_group(members) is not None for members in groups)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not 0 < args.scale <= 1 or args.seeds < 1 or args.curve_points < 1 or (args.group_size or 1) < 1:
        p.error("--scale must be in (0, 1], --seeds, --curve-points and --group-size at least 1")
    configs = {tag: list(cfgs) for tag, cfgs in itertools.groupby(run_configs(args), key=lambda c: c.spec.tag)}
    device_type = pick_device(args.device).type
    for cfgs in configs.values():  # the runs of one model after another
        if not train_model(args, cfgs, device_type):
            return 130  # stopped by a signal: the checkpoints are written
    report.write_report([args.out / "runs"], args.out)
    if args.sweep:
        for tag, cfgs in configs.items():
            report.write_sweep([Path(c.out) for c in cfgs], args.out / f"{tag}-sweep")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
