"""Test error of a checkpoint or exported weights: `python -m fastres.evaluate RUN_DIR_OR_WEIGHTS`."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastres import peers, progress, rundir, weights
from fastres.atomic import write_json
from fastres.checkpoint import Normalization
from fastres.cli import Parser, run_main
from fastres.config import LOADERS, PROGRESS, RunConfig
from fastres.data import loaders
from fastres.data.dataset import DATASETS
from fastres.errors import UsageError
from fastres.models import build_model
from fastres.runtime import PRECISIONS, param_dtype, pick_device, requested_precision, resolve_precision, tensor_dtype
from fastres.step import class_errors


@dataclass
class Loaded:
    """A model to evaluate, its config, the iteration it was saved at (None if unknown) and
    the normalisation it was trained with (None: a checkpoint from before it was saved)."""

    model: nn.Module
    cfg: RunConfig
    step: int | None
    normalization: Normalization | None


def normalization_of(loaded: Loaded, prepared: loaders.Prepared) -> tuple[np.ndarray, np.ndarray]:
    """The mean and std the model was trained with: its own, so evaluating on other data
    never normalises with that data's statistics. A checkpoint from before they were saved
    (format 0) falls back to the run's training split, and says so."""
    if loaded.normalization is not None:
        return loaded.normalization.mean.numpy(), loaded.normalization.std.numpy()
    print("fastres: note: this checkpoint predates saved normalisation: using the training split of the data",
          file=sys.stderr)
    return prepared.mean, prepared.std


def is_export(path: Path) -> bool:
    return path.is_file() and path.suffix == ".pt" and weights.meta_path(path).is_file()


def load_run(path: str) -> Loaded:
    """A run directory's (or a checkpoint file's) model, through the run directory's reader."""
    ckpt = rundir.read_checkpoint(path)
    cfg = ckpt.config
    model = build_model(cfg.model, cfg.shortcut, DATASETS[cfg.dataset].num_classes)
    return Loaded(weights.load_into(model, ckpt.model, path), cfg, ckpt.step, ckpt.normalization)


def load_export(path: Path) -> Loaded:
    """Exported weights: fp32 unless the run's precision is recorded, NCHW, the torch loader."""
    state, meta = weights.read(path)
    norm = Normalization(*(torch.tensor(meta["normalization"][k]) for k in ("mean", "std")))
    cfg = RunConfig(model=meta["model"], shortcut=meta.get("shortcut"), normalize=meta["normalize"],
                    precision=meta.get("precision"), dataset=meta.get("dataset", "cifar10"))
    model = build_model(cfg.model, cfg.shortcut, DATASETS[cfg.dataset].num_classes)
    return Loaded(weights.load_into(model, state, str(path)), cfg, meta.get("step"), norm)


def load_peer(path: Path) -> Loaded:
    """A peer's published checkpoint, evaluated in fp32 with the peer's own normalisation."""
    model, mean, std = peers.akamaster(path)
    cfg = RunConfig(model=f"resnet{model.depth}", shortcut="A", normalize="channel", precision="fp32")
    return Loaded(model, cfg, None, Normalization(torch.from_numpy(mean), torch.from_numpy(std)))


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m fastres.evaluate", description="Single-view test error of a fastres checkpoint.")
    p.add_argument("checkpoint", help="a run directory, its checkpoint.pt, weights exported by fastres.export, "
                   "or with --import a peer's checkpoint")
    p.add_argument("--import", dest="peer", choices=peers.PEERS,
                   help="the checkpoint is a peer's (akamaster: pytorch_resnet_cifar10's resnetN-*.th)")
    p.add_argument("--data", help="evaluate on this data instead of the run's (exported or imported weights: "
                   "default the official archive)")
    p.add_argument("--device", default="auto")
    p.add_argument("--loader", choices=LOADERS, help="input pipeline (default: the run's)")
    p.add_argument("--per-class", action="store_true", help="also print the error of every class (a rich table)")
    p.add_argument("--json", type=Path, help="write the errors, overall and per class, to this JSON file")
    p.add_argument("--progress", choices=PROGRESS, default="auto",
                   help="how decoding the data on its first use is shown: rich bar, plain log lines, or none "
                   "(default auto)")
    args = p.parse_args(argv)
    path = Path(args.checkpoint)
    loaded = load_peer(path) if args.peer else load_export(path) if is_export(path) else load_run(args.checkpoint)
    cfg = dataclasses.replace(loaded.cfg, data=args.data or loaded.cfg.data, loader=args.loader or loaded.cfg.loader)
    device = pick_device(args.device)
    precision, _ = resolve_precision(device, cfg.precision or requested_precision(cfg.amp, cfg.amp_dtype))
    dtype = PRECISIONS[precision]
    model = loaded.model.to(device, param_dtype(precision))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The test split alone, unless the run's own validation split is asked for (it is cut
    # from the training split) or an old checkpoint lacks its normalisation.
    need_train = loaded.normalization is None or (cfg.val_split > 0 and not args.data)
    prepared = loaders.prepare(cfg.data, cfg.val_split if need_train else 0, cfg.seed, cfg.normalize,
                               splits=("train", "test") if need_train else ("test",), dataset=cfg.dataset,
                               progress=progress.resolve(args.progress))
    mean, std = normalization_of(loaded, prepared)
    evals = loaders.build_evals(prepared, loaders.Placement(device, tensor_dtype(precision), cfg.channels_last),
                                mean=mean, std=std, eval_batch_size=cfg.eval_batch_size, loader=cfg.loader)
    at = f" at iteration {loaded.step}" if loaded.step is not None else ""
    classes = DATASETS[cfg.dataset].classes
    report: dict[str, Any] = {"model": cfg.spec.tag, "dataset": cfg.dataset, "step": loaded.step,
                              "data": prepared.source.describe()}
    for name, loader in evals.items():
        wrong, total = class_errors(model, loader, device, dtype, len(classes))
        report[name] = {"error": sum(wrong) / sum(total), "images": sum(total),
                        "per_class": {c: w / t if t else None for c, w, t in zip(classes, wrong, total, strict=True)}}
        print(f"{cfg.spec.tag}{at}: {name} error {100 * report[name]['error']:.2f}%")
        if args.per_class:
            print_classes(name, report[name]["per_class"])
    if args.json:
        if rundir.is_own_name(args.json):
            raise UsageError(f"--json {args.json}: a run directory's own file name; write the errors elsewhere")
        write_json(args.json, report)
    return 0


def print_classes(split: str, per_class: dict[str, float | None]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{split} error per class")
    table.add_column("class")
    table.add_column("error", justify="right")
    for name, error in per_class.items():
        table.add_row(name, "-" if error is None else f"{100 * error:.2f}%")
    Console().print(table)


if __name__ == "__main__":
    sys.exit(run_main(main))
