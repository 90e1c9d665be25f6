"""Build the training and evaluation loaders of a run (`--loader torch|dali`) from plain
arguments: the data once prepared, batch sizes, a seed and where batches are made."""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from fastres.data import pixels, sources
from fastres.data.dataset import Splits, hold_out
from fastres.data.images import SPLIT_NAMES
from fastres.data.torch_loader import TorchLoader
from fastres.errors import DataError, UsageError

Batch = tuple[torch.Tensor, torch.Tensor]


class Loader(Protocol):
    """What the trainer needs of any loader: epochs of (images, labels) device batches."""

    steps_per_epoch: int

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]: ...


@dataclass(frozen=True)
class Prepared:
    """A run's data: where it came from, its splits, and the normalisation of its training
    split (the per-pixel mean is a float64 pass over 50k images: computed once, when first
    asked for; evaluation with a checkpoint's own normalisation never asks)."""

    source: sources.Source
    splits: Splits
    normalize: str = "pixel"
    val_split: int = 0
    split_seed: int = 0

    @functools.cached_property
    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self.splits.train) == 0:
            raise DataError(f"{self.source.describe()}: no training images were read, so there is no "
                            "normalisation to compute")
        return pixels.normalization_stats(self.splits.train.images, self.normalize)

    @property
    def mean(self) -> np.ndarray:
        return self.stats[0]

    @property
    def std(self) -> np.ndarray:
        return self.stats[1]


def prepare(data: str | None, val_split: int = 0, seed: int = 0, normalize: str = "pixel",
            splits: tuple[str, ...] = SPLIT_NAMES, dataset: str = "cifar10", progress: str = "none") -> Prepared:
    """Resolve, load (from the decoded cache when possible), split and normalise, once per
    process for the same files and arguments: a benchmark or GPU check building many
    loaders pays for it once. `splits=("test",)` reads no training images (evaluation);
    `progress` ("rich", "plain", "none"): how decoding images is shown."""
    source = sources.resolve(data, splits=splits, dataset=dataset)
    token = _PROGRESS.set(progress)
    try:
        return _prepare(source, sources.fingerprint(source), _whole_set(data, source, dataset), val_split, seed,
                        normalize)
    finally:
        _PROGRESS.reset(token)


def _whole_set(data: str | None, source: sources.Source, dataset: str) -> str | None:
    """For a test-only source (evaluation): the fingerprint of the whole set, train and test,
    when it reads the very same test files, so that the test split a training run decoded
    with it is read from the cache (`sources.load`); None otherwise, or when the whole set
    cannot be resolved or listed."""
    if "train" in source.splits:
        return None
    try:
        whole = sources.resolve(data, dataset=dataset)
        return sources.fingerprint(whole) if set(source.paths) <= set(whole.paths) else None
    except DataError:  # no training images, or a folder that cannot be listed: no whole set to reuse
        return None


# How a cache miss of `_prepare` shows its decoding: not in the cache's key, since it changes
# nothing that is returned (a run with plain logs reuses what a bare prepare() made).
_PROGRESS: contextvars.ContextVar[str] = contextvars.ContextVar("fastres_decode_progress", default="none")


@functools.lru_cache(maxsize=2)
def _prepare(source: sources.Source, fingerprint: str, whole: str | None, val_split: int, seed: int,
             normalize: str) -> Prepared:
    splits = hold_out(sources.load(source, key=fingerprint, whole=whole, progress=_PROGRESS.get()), val_split, seed)
    if normalize not in pixels.NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalize!r}")
    return Prepared(source, splits, normalize, val_split, seed)


@dataclass
class Data:
    train: Loader
    evals: dict[str, Loader]  # "test", and "val" with --val-split
    source: str
    train_size: int


@dataclass(frozen=True)
class Placement:
    """Where and how batches are produced: device, dtype, layout and shard of this process.
    `host=True` makes the batches on the CPU and copies each one to `device` (the host
    loader the benchmark compares against the device-resident one). `slabs`: the torch
    loader's training batches made ahead in slabs (True), one at a time (False), or as its
    size rule says (None; `TorchLoader`): the same batches either way, so only the benchmark,
    which measures what slabs gain, sets it."""

    device: torch.device
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    shard_id: int = 0
    num_shards: int = 1
    host: bool = False
    slabs: bool | None = None


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The one host-to-device hop for batches made on the host: pinned and asynchronous
    on a GPU (the copy overlaps the previous step), a no-op where they already are."""
    x, y = batch
    if x.device == device:
        return x, y
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class HostToDevice:
    """A loader whose batches are made on the host, each sent through `to_device`:
    training and evaluation alike, so no host batch ever meets a device model."""

    def __init__(self, loader: Loader, device: torch.device) -> None:
        self.loader, self.device = loader, device
        self.steps_per_epoch = loader.steps_per_epoch

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        for batch in self.loader.epoch(epoch, start):
            yield to_device(batch, self.device)


def _source_splits(data: Prepared, loader: str) -> tuple[Splits, type]:
    """The splits a loader reads (DALI decodes the encoded files itself: same files, order
    and split as the arrays) and the loader class."""
    if loader != "dali":
        return data.splits, TorchLoader
    from fastres.data.dali_loader import DaliLoader, require_dali

    require_dali()
    encoded = sources.load_encoded(data.source)
    return (data.splits if encoded is None else hold_out(encoded, data.val_split, data.split_seed)), DaliLoader


def _placed(loader: Loader, where: Placement) -> Loader:
    return HostToDevice(loader, where.device) if where.host else loader


def build_evals(data: Prepared, where: Placement, *, mean: np.ndarray, std: np.ndarray,
                eval_batch_size: int = 1000, loader: str = "torch") -> dict[str, Loader]:
    """Evaluation loaders alone ("test", and "val" with a validation split), normalised with
    the given mean and std (a checkpoint's own): evaluation needs no training loader."""
    splits, loader_cls = _source_splits(data, loader)
    common = dict(mean=mean, std=std, device=torch.device("cpu") if where.host else where.device, dtype=where.dtype,
                  channels_last=where.channels_last)
    held = {"test": splits.test, "val": splits.val}
    return {name: _placed(loader_cls(split, eval_batch_size, train=False, **common), where)
            for name, split in held.items() if split is not None}


def build(data: Prepared, where: Placement, *, batch_size: int = 128, eval_batch_size: int = 1000,
          seed: int | Sequence[int] = 0, loader: str = "torch") -> Data:
    """Loaders for a run: training batches are `batch_size / num_shards` per process. Several
    seeds: the training batches of a fused group of runs (the torch loader only)."""
    if loader == "dali" and not isinstance(seed, int):
        raise UsageError(f"--loader dali feeds one run: train fused runs ({len(seed)} seeds) with --loader torch, "
                         "or the seeds one after another (--fuse off)")
    splits, loader_cls = _source_splits(data, loader)
    made_ahead = {"slabs": where.slabs} if loader_cls is TorchLoader else {}  # DALI makes its own batches
    train = loader_cls(splits.train, batch_size // where.num_shards, train=True, seed=seed, mean=data.mean,
                       std=data.std, device=torch.device("cpu") if where.host else where.device, dtype=where.dtype,
                       channels_last=where.channels_last, shard_id=where.shard_id, num_shards=where.num_shards,
                       **made_ahead)
    evals = build_evals(data, where, mean=data.mean, std=data.std, eval_batch_size=eval_batch_size, loader=loader)
    described = f"{data.source.describe()} ({loader} loader{', on the host' if where.host else ''})"
    return Data(_placed(train, where), evals, described, len(splits.train))
