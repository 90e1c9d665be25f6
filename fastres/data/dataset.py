"""In-memory CIFAR-10: uint8 images and labels per split, whatever the source."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastres.errors import DataError

# CIFAR-10 label order, which is also alphabetical order.
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = len(CLASSES)
IMAGE_SHAPE = (32, 32, 3)


@dataclass(frozen=True)
class Split:
    """Decoded images (N, 32, 32, 3) uint8 HWC and labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> Split:
        return Split(self.images[idx], self.labels[idx])

    @staticmethod
    def concat(parts: list[Split]) -> Split:
        return Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


@dataclass(frozen=True)
class EncodedSplit:
    """Encoded image files (JPEG/PNG bytes as uint8 arrays) and labels, for decoders such
    as DALI's that take the files themselves."""

    files: list[np.ndarray]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> EncodedSplit:
        return EncodedSplit([self.files[i] for i in idx], self.labels[idx])


@dataclass(frozen=True)
class Splits:
    """Training and test data; `val` is a held-out part of the training set, or None."""

    train: Split | EncodedSplit
    test: Split | EncodedSplit
    val: Split | EncodedSplit | None = None


def hold_out(splits: Splits, val_size: int, seed: int) -> Splits:
    """Move a seeded random `val_size` of the training set into a validation split, as the
    paper did (45k/5k) to choose its schedule."""
    n = len(splits.train)
    if val_size == 0:
        return splits
    if not 0 < val_size < n:
        raise DataError(f"--val-split {val_size} must be between 0 and the {n} training images")
    perm = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(perm[:val_size]), np.sort(perm[val_size:])
    return Splits(splits.train.subset(train_idx), splits.test, splits.train.subset(val_idx))


def check_split(split: Split, name: str) -> None:
    """Every class present and every image 32x32 RGB: a smaller set is never silent."""
    if split.images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{name}: images are {split.images.shape[1:]}, expected {IMAGE_SHAPE}")
    missing = sorted(set(range(NUM_CLASSES)) - set(np.unique(split.labels).tolist()))
    if missing:
        raise DataError(f"{name}: no images of class {', '.join(CLASSES[i] for i in missing)}")
