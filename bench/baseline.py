"""The baseline: CIFAR-10 training written the way a typical PyTorch user writes it.

A `Dataset` whose `__getitem__` normalises, pads, crops and flips one image in NumPy, a
`DataLoader` with worker processes, eager fp32 NCHW, and the loss read with `.item()`
every step for logging (a host sync per step, as in most training scripts). The network
is fastres' (the comparison is about everything around it); nothing else of fastres'
step or loaders is used here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


class CifarDataset(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: np.ndarray, train: bool) -> None:
        self.images, self.labels, self.mean, self.train = images, labels, mean, train

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].astype(np.float32) / 255.0 - self.mean
        if self.train:
            x = np.pad(x, ((4, 4), (4, 4), (0, 0)))
            top, left = np.random.randint(0, 9, size=2)
            x = x[top:top + 32, left:left + 32]
            if np.random.rand() < 0.5:
                x = x[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), int(self.labels[i])


def make_loader(images: np.ndarray, labels: np.ndarray, mean: np.ndarray, batch_size: int, device: torch.device,
                workers: int | None = None) -> DataLoader:
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    return DataLoader(CifarDataset(images, labels, mean, train=True), batch_size=batch_size, shuffle=True,
                      drop_last=True, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0)


def batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches, epoch after epoch."""
    while True:
        yield from loader


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, data: Iterator, device: torch.device,
                steps: int) -> float:
    """`steps` plain training steps; returns the summed loss as a typical script logs it."""
    total = 0.0
    for _ in range(steps):
        x, y = next(data)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total
