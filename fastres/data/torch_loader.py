"""The GPU-resident loader (also the CPU fallback): the whole uint8 set lives on the
device, each epoch is a seeded full reshuffle, and every batch has the same shape. Where
memory allows, a training epoch's batches are made ahead in a few large kernels, slab by
slab, so that nearly every step costs no loader kernel: its batch is a view."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fastres import recipe
from fastres.data import augmentation, pixels
from fastres.data.dataset import Split

Batch = tuple[torch.Tensor, torch.Tensor]
# The largest slab, in images of all runs together: its float32 temporaries (at most two
# steps of the normalisation, the padded and the cropped images) stay under SLAB_BYTES,
# 560 MB. An epoch's slabs grow from one batch, doubling (1, 2, 4, ... batches) up to it, so
# a short benchmark makes about the batches it takes, not an epoch: CIFAR-10's 390 batches
# of 128 are 12 slabs (6 growing, then 64 batches each), about 100 kernels in all instead
# of about 9 a batch.
SLAB_IMAGES = 8192
SLAB_BYTES = SLAB_IMAGES * 4 * (4 * 3 * recipe.CROP**2 + 3 * (recipe.CROP + 2 * recipe.PAD) ** 2)


def free_memory(device: torch.device) -> int | None:
    """Bytes free now on `device`: the CUDA allocator's view of the GPU, the host's free
    pages on a CPU (page cache not counted: a lower bound); None where it is not known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def fits_slabs(slab_bytes: int, free: int | None) -> bool:
    """The size rule: make batches in slabs when two slabs (the one being made and the one
    before it, whose last batch the step still holds) and a slab's temporaries fit in a
    quarter of the memory free when the loader is made. The other three quarters are for
    the model, its activations and optimizer state, the evaluation loaders and, on a CPU,
    the other processes (torchrun's ranks each hold their own). A slab of 8,192 images in
    fp32 is 100 MB, so the rule asks for about 3 GB free. Elsewhere, batch by batch: the
    same batches, bit for bit, at about 9 small kernels a step."""
    return free is not None and 2 * slab_bytes + SLAB_BYTES <= free // 4


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

    `slabs`: make the training batches ahead, slab by slab (True), one at a time (False),
    or as `fits_slabs` rules for this device (None). The batches are the same either way,
    bit for bit (tests/test_loader.py), so the rule may depend on the machine. A batch made
    in a slab is a view of the slab (holding it holds the slab).
    """

    def __init__(self, split: Split, batch_size: int, mean: np.ndarray, std: np.ndarray, *,
                 device: torch.device, train: bool, seed: int | Sequence[int] = 0, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, shard_id: int = 0, num_shards: int = 1,
                 slabs: bool | None = None) -> None:
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
        self.slab_batches = max(SLAB_IMAGES // (runs * batch_size), 1)  # the largest slab
        if slabs is None and train:
            image_bytes = recipe.CROP**2 * self.images.shape[-1] * dtype.itemsize
            slabs = fits_slabs(self.slab_batches * runs * batch_size * image_bytes, free_memory(device))
        self.slabs = bool(slabs) and train

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
        if self.slabs:
            yield from self._in_slabs(order, rows, cols, start)
            return
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

    def _in_slabs(self, order: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, start: int) -> Iterator[Batch]:
        """The batches from `start` on, made a slab at a time (1, 2, 4, ... batches, up to
        `slab_batches`), each batch a view of its slab."""
        k, size = start, 1
        while k < self.steps_per_epoch:
            end = min(k + size, self.steps_per_epoch)
            x, y = self._slab(order, rows, cols, k, end)
            for i in range(end - k):
                yield x[i].permute(0, 3, 1, 2) if self.channels_last else x[i], y[i, :, 0] if y.shape[2] == 1 else y[i]
            k, size = end, min(2 * size, self.slab_batches)

    def _slab(self, order: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, k0: int,
              k1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batches k0 to k1 by the per-batch path's operations on all their images at once
        (elementwise ops and gathers: the same bits whatever the batch), in the model's dtype:
        images (n, B, H, W, runs*C) for channels_last, else (n, B, runs*C, H, W); labels
        (n, B, runs). The float32 temporaries are gone when it returns."""
        runs, b, size = len(self.seeds), self.batch_size, recipe.CROP
        sl = slice(k0 * b, k1 * b)
        idx = order[:, sl]  # (runs, n*B)
        x = pixels.normalize(self.images[idx.flatten()], self.mean, self.inv_std)
        index = torch.arange(x.shape[0], device=x.device)[:, None, None]
        x = pixels.pad_crop_flip(x, rows[:, sl].flatten(0, 1), cols[:, sl].flatten(0, 1), index)
        # (runs*n*B, H, W, C) -> (n, B, H, W, runs*C): each run's channels side by side
        x = x.view(runs, k1 - k0, b, size, size, -1).permute(1, 2, 3, 4, 0, 5).flatten(4)
        if not self.channels_last:
            x = x.permute(0, 1, 4, 2, 3)
        out = torch.empty(x.shape, dtype=self.dtype, device=x.device).copy_(x)
        return out, self.labels[idx.t()].view(k1 - k0, b, runs)

    def _eval_batches(self) -> Iterator[Batch]:
        for k in range(self.steps_per_epoch):
            sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
            x = pixels.normalize(self.images[sl], self.mean, self.inv_std)
            yield pixels.to_model_layout(x, self.channels_last, self.dtype), self.labels[sl]
