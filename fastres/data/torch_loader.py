"""The GPU-resident loader (also the CPU fallback): the whole uint8 set lives on the
device, each epoch is a seeded full reshuffle, and every batch has the same shape."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fastres.data import augmentation, pixels
from fastres.data.dataset import Split

Batch = tuple[torch.Tensor, torch.Tensor]


class TorchLoader:
    """Batches of `batch_size` images from a split held on `device`.

    Training (`train=True`): every epoch a seeded permutation of the whole set, the last
    partial batch dropped (static shapes), and the paper's crop and flip per image. With
    `num_shards` > 1 (one per process) each shard takes every `num_shards`-th image of the
    same global permutation, so shards are disjoint and `batch_size` is per shard.
    Several seeds (a fused group of runs, `fastres.fused`): each step gathers every run's
    batch, as that run alone would get it, in one go, and stacks them on the channel axis:
    images (B, runs*3, H, W), labels (B, runs).
    Evaluation: the images in order, one view each, the last batch possibly smaller.
    """

    def __init__(self, split: Split, batch_size: int, mean: np.ndarray, std: np.ndarray, *,
                 device: torch.device, train: bool, seed: int | Sequence[int] = 0, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, shard_id: int = 0, num_shards: int = 1) -> None:
        self.images = torch.from_numpy(split.images).to(device)  # (N, H, W, C) uint8
        self.labels = torch.from_numpy(split.labels).to(device)
        self.mean = torch.from_numpy(mean).to(device)
        self.inv_std = torch.from_numpy(1.0 / std).to(device)
        self.seeds = (seed,) if isinstance(seed, int) else tuple(seed)
        self.batch_size, self.train = batch_size, train
        self.dtype, self.channels_last = dtype, channels_last
        self.shard_id, self.num_shards = shard_id, num_shards
        runs = len(self.seeds)
        self.batch_index = torch.arange(runs * batch_size, device=device)[:, None, None]  # made once, not per batch
        n = len(split)
        self.steps_per_epoch = augmentation.steps_per_epoch(n, batch_size, train, num_shards)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of one epoch from batch `start` on (resume restarts mid-epoch)."""
        if not self.train:
            yield from self._eval_batches()
            return
        device = self.images.device  # one host-to-device copy of the plans per epoch
        plans = [augmentation.epoch_plan(len(self.labels), seed, epoch, self.shard_id, self.num_shards)
                 for seed in self.seeds]
        order = torch.stack([p.order for p in plans]).to(device)  # (runs, n)
        rows, cols = pixels.crop_indices(torch.cat([p.offsets for p in plans]).to(device),
                                         torch.cat([p.flips for p in plans]).to(device))
        rows, cols = rows.view(*order.shape, -1), cols.view(*order.shape, -1)  # (runs, n, 32)
        runs = len(self.seeds)
        for k in range(start, self.steps_per_epoch):
            sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
            idx = order[:, sl]
            x = pixels.normalize(self.images[idx.flatten()], self.mean, self.inv_std)
            x = pixels.pad_crop_flip(x, rows[:, sl].flatten(0, 1), cols[:, sl].flatten(0, 1), self.batch_index)
            if runs == 1:
                yield pixels.to_model_layout(x, self.channels_last, self.dtype), self.labels[idx[0]]
                continue
            # (runs*B, H, W, C) -> (B, H, W, runs*C): each run's channels side by side
            x = x.unflatten(0, (runs, self.batch_size)).permute(1, 2, 3, 0, 4).flatten(3)
            yield pixels.to_model_layout(x, self.channels_last, self.dtype), self.labels[idx].t()

    def _eval_batches(self) -> Iterator[Batch]:
        for k in range(self.steps_per_epoch):
            sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
            x = pixels.normalize(self.images[sl], self.mean, self.inv_std)
            yield pixels.to_model_layout(x, self.channels_last, self.dtype), self.labels[sl]
