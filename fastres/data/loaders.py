"""Build the training and evaluation loaders a run asks for (`--loader torch|dali`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from fastres.config import RunConfig
from fastres.data import augment, sources
from fastres.data.dataset import Splits, hold_out
from fastres.data.torch_loader import TorchLoader


class Loader(Protocol):
    """What the trainer needs of any loader: epochs of (images, labels) device batches."""

    steps_per_epoch: int

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class Data:
    train: Loader
    evals: dict[str, Loader]  # "test", and "val" with --val-split
    source: str
    train_size: int


@dataclass(frozen=True)
class Placement:
    """Where and how batches are produced: device, dtype, layout and shard of this process."""

    device: torch.device
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    shard_id: int = 0
    num_shards: int = 1


def load_splits(cfg: RunConfig) -> tuple[sources.Source, Splits]:
    source = sources.resolve(cfg.data)
    return source, hold_out(sources.load(source), cfg.val_split, cfg.seed)


def build(cfg: RunConfig, where: Placement) -> Data:
    """Loaders for a run: training batches are `batch_size / num_shards` per process."""
    source, splits = load_splits(cfg)
    mean, std = augment.normalization_stats(splits.train.images, cfg.normalize)
    loader_cls: type = TorchLoader
    if cfg.loader == "dali":
        from fastres.data.dali_loader import DaliLoader, require_dali

        require_dali()
        loader_cls = DaliLoader
        encoded = sources.load_encoded(source)
        if encoded is not None:  # DALI decodes the files: same files, order and split as the arrays
            splits = hold_out(encoded, cfg.val_split, cfg.seed)
    common = dict(mean=mean, std=std, device=where.device, dtype=where.dtype, channels_last=where.channels_last)
    train = loader_cls(splits.train, cfg.batch_size // where.num_shards, train=True, seed=cfg.seed,
                       shard_id=where.shard_id, num_shards=where.num_shards, **common)
    evals = {"test": loader_cls(splits.test, cfg.eval_batch_size, train=False, **common)}
    if splits.val is not None:
        evals["val"] = loader_cls(splits.val, cfg.eval_batch_size, train=False, **common)
    return Data(train, evals, f"{source.describe()} ({cfg.loader} loader)", len(splits.train))
