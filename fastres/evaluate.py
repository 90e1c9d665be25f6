"""Test error of a checkpoint or exported weights: `python -m fastres.evaluate RUN_DIR_OR_WEIGHTS`."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastres import checkpoint, peers, weights
from fastres.atomic import write_json
from fastres.cli import Parser, run_main
from fastres.config import LOADERS, RunConfig
from fastres.data import loaders
from fastres.data.dataset import DATASETS
from fastres.models import build_model
from fastres.runtime import PRECISIONS, param_dtype, pick_device, requested_precision, resolve_precision, tensor_dtype
from fastres.step import class_errors


def normalization_of(state: dict[str, Any], prepared: loaders.Prepared) -> tuple[np.ndarray, np.ndarray]:
    """The mean and std the model was trained with: the checkpoint's own, so evaluating on
    other data never normalises with that data's statistics. A checkpoint from before they
    were saved (format 0) falls back to the run's training split, and says so."""
    norm = state.get("normalization")
    if norm is not None:
        return norm["mean"].numpy(), norm["std"].numpy()
    print("fastres: note: this checkpoint predates saved normalisation: using the training split of the data",
          file=sys.stderr)
    return prepared.mean, prepared.std


def is_export(path: Path) -> bool:
    return path.is_file() and path.suffix == ".pt" and weights.meta_path(path).is_file()


Loaded = tuple[nn.Module, dict[str, Any], RunConfig]  # the model, a checkpoint-like state, a config


def load_run(path: str) -> Loaded:
    state = checkpoint.load(path)
    cfg = checkpoint.config_of(state)
    model = build_model(cfg.model, cfg.shortcut, DATASETS[cfg.dataset].num_classes)
    return weights.load_into(model, state["model"], path), state, cfg


def load_export(path: Path) -> Loaded:
    """Exported weights: fp32 unless the run's precision is recorded, NCHW, the torch loader."""
    state, meta = weights.read(path)
    norm = {k: torch.tensor(v) for k, v in meta["normalization"].items()}
    cfg = RunConfig(model=meta["model"], shortcut=meta.get("shortcut"), normalize=meta["normalize"],
                    precision=meta.get("precision"), dataset=meta.get("dataset", "cifar10"))
    model = build_model(cfg.model, cfg.shortcut, DATASETS[cfg.dataset].num_classes)
    model = weights.load_into(model, state, str(path))
    return model, {"step": meta.get("step"), "normalization": norm}, cfg


def load_peer(peer: str, path: Path) -> Loaded:
    """A peer's published checkpoint, evaluated in fp32 with the peer's own normalisation."""
    model, mean, std = peers.akamaster(path)
    cfg = RunConfig(model=f"resnet{model.depth}", shortcut="A", normalize="channel", precision="fp32")
    return model, {"step": None, "normalization": {"mean": torch.from_numpy(mean), "std": torch.from_numpy(std)}}, cfg


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
    args = p.parse_args(argv)
    path = Path(args.checkpoint)
    model, state, cfg = (load_peer(args.peer, path) if args.peer else load_export(path) if is_export(path)
                         else load_run(args.checkpoint))
    cfg = dataclasses.replace(cfg, data=args.data or cfg.data, loader=args.loader or cfg.loader)
    device = pick_device(args.device)
    precision, _ = resolve_precision(device, cfg.precision or requested_precision(cfg.amp, cfg.amp_dtype))
    dtype = PRECISIONS[precision]
    model = model.to(device, param_dtype(precision))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The test split alone, unless the run's own validation split is asked for (it is cut
    # from the training split) or an old checkpoint lacks its normalisation.
    need_train = "normalization" not in state or (cfg.val_split > 0 and not args.data)
    prepared = loaders.prepare(cfg.data, cfg.val_split if need_train else 0, cfg.seed, cfg.normalize,
                               splits=("train", "test") if need_train else ("test",), dataset=cfg.dataset)
    mean, std = normalization_of(state, prepared)
    evals = loaders.build_evals(prepared, loaders.Placement(device, tensor_dtype(precision), cfg.channels_last),
                                mean=mean, std=std, eval_batch_size=cfg.eval_batch_size, loader=cfg.loader)
    at = f" at iteration {state['step']}" if state.get("step") is not None else ""
    classes = DATASETS[cfg.dataset].classes
    report: dict[str, Any] = {"model": cfg.spec.tag, "dataset": cfg.dataset, "step": state.get("step"),
                              "data": prepared.source.describe()}
    for name, loader in evals.items():
        wrong, total = class_errors(model, loader, device, dtype, len(classes))
        report[name] = {"error": sum(wrong) / sum(total), "images": sum(total),
                        "per_class": {c: w / t if t else None for c, w, t in zip(classes, wrong, total, strict=True)}}
        print(f"{cfg.spec.tag}{at}: {name} error {100 * report[name]['error']:.2f}%")
        if args.per_class:
            print_classes(name, report[name]["per_class"])
    if args.json:
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
