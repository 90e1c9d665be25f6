"""The paper's augmentation, its geometry and its randomness in one place: 4-pixel zero
padding, a random 32x32 crop and a horizontal flip with p = 0.5 per image, and a seeded full
reshuffle every epoch. A plan holds what an epoch feeds (order, offsets, flips); the torch
pixel ops (`pixels.py`) and the DALI graph (`dali_loader.py`) both carry it out, so the two
loaders train on the same batches and any epoch can be replayed exactly on resume."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastres import recipe
from fastres.errors import DataError


@dataclass(frozen=True)
class EpochPlan:
    order: torch.Tensor  # (n,) int64 image indices, this shard's share of the permutation
    offsets: torch.Tensor  # (n, 2) int64 (dy, dx) in [-PAD, PAD]
    flips: torch.Tensor  # (n,) bool


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """One generator per (seed, epoch)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def draw(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image crop offsets, uniform integers in [-PAD, PAD] on each axis, and flips
    with probability 0.5."""
    offsets = torch.randint(-recipe.PAD, recipe.PAD + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    return offsets, flips


def epoch_plan(n: int, seed: int, epoch: int, shard_id: int = 0, num_shards: int = 1) -> EpochPlan:
    """A full reshuffle of all `n` images; shard k takes every `num_shards`-th image of
    the same global permutation, so shards are disjoint and together cover the epoch."""
    g = epoch_generator(seed, epoch)
    order = torch.randperm(n, generator=g)
    offsets, flips = draw(n, g)
    take = slice(shard_id, None, num_shards)
    return EpochPlan(order[take], offsets[take], flips[take])


def in_order(n: int) -> EpochPlan:
    """Evaluation: every image once, in order, unaugmented."""
    return EpochPlan(torch.arange(n), torch.zeros(n, 2, dtype=torch.int64), torch.zeros(n, dtype=torch.bool))


def steps_per_epoch(n: int, batch_size: int, train: bool, num_shards: int = 1) -> int:
    """Training: full batches per shard, the remainder dropped so shapes stay static.
    Evaluation: every image once, the last batch possibly smaller."""
    if not train:
        return -(-n // batch_size)
    steps = n // num_shards // batch_size
    if steps == 0:
        raise DataError(f"{n} training images make no batch of {batch_size}"
                        + (f" per process ({num_shards} processes)" if num_shards > 1 else "")
                        + ": use a smaller --batch-size")
    return steps
