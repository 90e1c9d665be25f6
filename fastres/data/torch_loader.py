"""The GPU-resident loader (also the CPU fallback): the whole uint8 set lives on the
device, each epoch is a seeded full reshuffle, and every batch has the same shape."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from fastres.data import augment
from fastres.data.dataset import Split

Batch = tuple[torch.Tensor, torch.Tensor]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """One generator per (seed, epoch), so any epoch can be replayed on resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class TorchLoader:
    """Batches of `batch_size` images from a split held on `device`.

    Training (`train=True`): every epoch a seeded permutation of the whole set, the last
    partial batch dropped (static shapes), and the paper's crop and flip per image. With
    `num_shards` > 1 (one per process) each shard takes every `num_shards`-th image of the
    same global permutation, so shards are disjoint and `batch_size` is per shard.
    Evaluation: the images in order, one view each, the last batch possibly smaller.
    """

    def __init__(self, split: Split, batch_size: int, mean: np.ndarray, std: np.ndarray, *,
                 device: torch.device, train: bool, seed: int = 0, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, shard_id: int = 0, num_shards: int = 1) -> None:
        self.images = torch.from_numpy(split.images).to(device)  # (N, H, W, C) uint8
        self.labels = torch.from_numpy(split.labels).to(device)
        self.mean = torch.from_numpy(mean).to(device)
        self.inv_std = torch.from_numpy(1.0 / std).to(device)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.dtype, self.channels_last = dtype, channels_last
        self.shard_id, self.num_shards = shard_id, num_shards
        n = len(split) // num_shards if train else len(split)
        self.steps_per_epoch = n // batch_size if train else -(-n // batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(split)} images make no batch of {batch_size} per shard")

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This shard's image order, crop offsets and flips for one epoch, drawn on the host
        and moved to the device once per epoch."""
        g = epoch_generator(self.seed, epoch)
        order = torch.randperm(len(self.labels), generator=g)
        offsets, flips = augment.draw_augmentation(len(order), g)
        take = slice(self.shard_id, None, self.num_shards)
        device = self.images.device
        return order[take].to(device), offsets[take].to(device), flips[take].to(device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of one epoch from batch `start` on (resume restarts mid-epoch)."""
        if not self.train:
            yield from self._eval_batches()
            return
        order, offsets, flips = self._epoch_plan(epoch)
        for k in range(start, self.steps_per_epoch):
            sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
            idx = order[sl]
            x = augment.normalize(self.images[idx], self.mean, self.inv_std)
            x = augment.pad_crop_flip(x, offsets[sl], flips[sl])
            yield augment.to_model_layout(x, self.channels_last, self.dtype), self.labels[idx]

    def _eval_batches(self) -> Iterator[Batch]:
        for k in range(self.steps_per_epoch):
            sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
            x = augment.normalize(self.images[sl], self.mean, self.inv_std)
            yield augment.to_model_layout(x, self.channels_last, self.dtype), self.labels[sl]

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)
