"""The pixel work of the paper's preprocessing as batched torch ops: normalise, then the
zero-pad, crop and flip that an epoch plan (`augmentation.py`) prescribes.

Images stay uint8 HWC until a batch is taken. Normalisation comes first, so the padding
is zero in normalised space, as in the paper ("4 pixels are padded on each side" of the
mean-subtracted image). All ops are whole-batch: no Python loop over images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fastres import recipe
from fastres.recipe import CROP, PAD

NORMALIZATIONS = recipe.NORMALIZATIONS


def normalization_stats(train_images: np.ndarray, mode: str = "pixel") -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (HWC, broadcastable, on the 0-1 scale) from the training images only.

    "pixel": the paper's per-pixel mean, std 1. "channel": per-channel mean and std.
    """
    x = train_images.astype(np.float64) / 255.0
    if mode == "pixel":
        return x.mean(axis=0).astype(np.float32), np.ones((1, 1, 3), np.float32)
    if mode == "channel":
        return (x.mean(axis=(0, 1, 2)).reshape(1, 1, 3).astype(np.float32),
                np.maximum(x.std(axis=(0, 1, 2)), 1e-3).reshape(1, 1, 3).astype(np.float32))  # no 0-division
    raise ValueError(f"unknown normalization {mode!r}: choose one of {', '.join(NORMALIZATIONS)}")


def normalize(images: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) to float (B, H, W, C): (x / 255 - mean) / std."""
    return (images.float() * (1.0 / 255.0) - mean) * inv_std


def crop_indices(offsets: torch.Tensor, flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices into the 4-padded images, (N, 32) each, that crop every image
    at its (dy, dx) offset and mirror it where `flips` is set. Made once per epoch for all
    images, so a batch needs only one gather."""
    i = torch.arange(CROP, device=offsets.device) + PAD
    rows = offsets[:, 0, None] + i
    cols = offsets[:, 1, None] + i
    return rows, torch.where(flips[:, None], cols.flip(1), cols)


def pad_crop_flip(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
    """Zero-pad each image of (B, H, W, C) by 4 and gather its crop (see `crop_indices`);
    `batch_index` is arange(B)[:, None, None], kept by the caller across batches."""
    padded = F.pad(x, (0, 0, PAD, PAD, PAD, PAD))
    return padded[batch_index, rows[:, :, None], cols[:, None, :]]


def to_model_layout(x: torch.Tensor, channels_last: bool, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, W, C) to the NCHW tensor a model takes; a channels_last result is the same
    memory seen through a permutation, so it costs no copy."""
    x = x.permute(0, 3, 1, 2)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(dtype=dtype, memory_format=memory_format)
