"""The GPU-resident loader (also the CPU fallback): the whole uint8 set lives on the
device, each epoch is a seeded full reshuffle, and every batch has the same shape. Where
memory allows, each training epoch's batches are made at its start in a few large kernels,
so a step costs no loader kernel: its batch is a view."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fastres import recipe
from fastres.data import augmentation, pixels
from fastres.data.dataset import Split

Batch = tuple[torch.Tensor, torch.Tensor]
# Images (all runs' together) made in one go when a whole epoch is made: a few kernels per
# 8,192 images (7 slabs for CIFAR-10's 50k), whose float32 temporaries (at most two steps of
# the normalisation, the padded and the cropped images) stay under SLAB_BYTES, 560 MB.
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


def fits_whole_epoch(epoch_bytes: int, free: int | None) -> bool:
    """The size rule: make whole epochs when two of them (the epoch being made and the
    last batch of the one before, still held by the step, keep both alive at an epoch
    boundary) and a slab's temporaries fit in a quarter of the memory free when the loader
    is made. The other three quarters are for the model, its activations and optimizer
    state, the evaluation loaders and, on a CPU, the other processes (torchrun's ranks each
    hold their own). CIFAR-10 in fp32 (610 MB an epoch) needs 7.2 GB free; on a GPU a fused
    group of 8 in bf16 (2.5 GB an epoch) needs 22 GB free. Elsewhere, batch by batch:
    the same batches, bit for bit, at a few small kernels a step."""
    return free is not None and 2 * epoch_bytes + SLAB_BYTES <= free // 4


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

    `whole_epoch`: make each training epoch's batches at its start (True), batch by batch
    (False), or as `fits_whole_epoch` rules for this device (None). The batches are the
    same either way, bit for bit (tests/test_loader.py), so the rule may depend on the
    machine. A whole epoch's batch is a view of that epoch's buffer (holding it holds the
    buffer).
    """

    def __init__(self, split: Split, batch_size: int, mean: np.ndarray, std: np.ndarray, *,
                 device: torch.device, train: bool, seed: int | Sequence[int] = 0, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, shard_id: int = 0, num_shards: int = 1,
                 whole_epoch: bool | None = None) -> None:
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
        if whole_epoch is None and train:
            image_bytes = recipe.CROP**2 * self.images.shape[-1] * dtype.itemsize
            whole_epoch = fits_whole_epoch(self.steps_per_epoch * runs * batch_size * image_bytes, free_memory(device))
        self.whole_epoch = bool(whole_epoch) and train

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
        if self.whole_epoch:
            yield from self._whole_epoch(order, rows, cols, start)
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

    def _whole_epoch(self, order: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, start: int) -> Iterator[Batch]:
        """The batches from `start` on, made first into one buffer in the model's layout and
        dtype, slab by slab, by the per-batch path's operations on more images at once
        (elementwise and gathers: the same bits whatever the batch), then yielded as views."""
        runs, b, steps = len(self.seeds), self.batch_size, self.steps_per_epoch - start
        size, channels, device = recipe.CROP, runs * self.images.shape[-1], self.images.device
        # (steps, B, H, W, runs*C) is a channels_last batch per step; (steps, B, runs*C, H, W) NCHW
        shape = (steps, b, size, size, channels) if self.channels_last else (steps, b, channels, size, size)
        out = torch.empty(shape, dtype=self.dtype, device=device)
        taken = order[:, start * b:self.steps_per_epoch * b]  # (runs, steps*B)
        labels = self.labels[taken.t()].view(steps, b, runs)
        per_slab = max(SLAB_IMAGES // (runs * b), 1)  # batches a slab
        for k0 in range(0, steps, per_slab):
            k1 = min(k0 + per_slab, steps)
            sl = slice((start + k0) * b, (start + k1) * b)
            x = pixels.normalize(self.images[order[:, sl].flatten()], self.mean, self.inv_std)
            index = torch.arange(x.shape[0], device=device)[:, None, None]
            x = pixels.pad_crop_flip(x, rows[:, sl].flatten(0, 1), cols[:, sl].flatten(0, 1), index)
            # (runs*n*B, H, W, C) -> (n, B, H, W, runs*C): each run's channels side by side
            x = x.view(runs, k1 - k0, b, size, size, -1).permute(1, 2, 3, 4, 0, 5).flatten(4)
            out[k0:k1].copy_(x if self.channels_last else x.permute(0, 1, 4, 2, 3))
        for k in range(steps):
            x = out[k].permute(0, 3, 1, 2) if self.channels_last else out[k]
            yield x, labels[k, :, 0] if runs == 1 else labels[k]

    def _eval_batches(self) -> Iterator[Batch]:
        for k in range(self.steps_per_epoch):
            sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
            x = pixels.normalize(self.images[sl], self.mean, self.inv_std)
            yield pixels.to_model_layout(x, self.channels_last, self.dtype), self.labels[sl]
