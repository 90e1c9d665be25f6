"""Shared fixtures: tiny CIFAR-10 datasets in every supported format, built by the tests."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

# One CPU thread per test process, before torch is imported: pytest-xdist runs one worker per
# core, and the runs a test compares bit for bit (in-process and in subprocesses, which
# inherit this) must sum in the same order, which the thread count decides.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image

from fastres.config import RunConfig
from fastres.data.dataset import CLASSES, Split

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run slow real-data tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: opt in with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every test's decoded-data cache out of the user's home."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("FASTRES_CACHE", str(cache))
    return cache


def class_images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: each class has its own colour, plus noise."""
    rng = np.random.default_rng(seed)
    colours = np.random.default_rng(1234).integers(0, 256, (len(CLASSES), 3))
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    noise = rng.normal(0, 40, (len(labels), 32, 32, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels


def write_tree(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """`root/train/<class>/*.png` and `root/test/<class>/*.png`, lossless so pixels are exact."""
    for i, (split, n) in enumerate(per_class.items()):
        images, labels = class_images(n, seed + i)
        for k, (img, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{k:05d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 classes: 16 training and 4 test images each."""
    return write_tree(tmp_path_factory.mktemp("tree"), {"train": 16, "test": 4})


@pytest.fixture(scope="session")
def micro_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 classes: 2 training and 1 test image each, for what is slow per image (fp16 on a
    CPU: about 0.1 s an image forward, ATen's reference convolution)."""
    return write_tree(tmp_path_factory.mktemp("micro"), {"train": 2, "test": 1})


@contextlib.contextmanager
def fifo_writer(path: Path) -> Iterator[None]:
    """A writer at a FIFO's other end, so that code which wrongly opens it reads an empty file
    and fails its test, instead of hanging the suite; released when the block ends."""
    # os.open, not open(): tests watch what open() is called with
    writer = threading.Thread(target=lambda: os.close(os.open(path, os.O_WRONLY)), daemon=True)
    writer.start()
    try:
        yield
    finally:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # lets a writer still waiting go
        writer.join(10)
        os.close(fd)


def official_batch(images: np.ndarray, labels: np.ndarray) -> bytes:
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return pickle.dumps({b"batch_label": b"x", b"labels": labels.tolist(), b"data": rows, b"filenames": []})


def write_official(path: Path, per_batch: int = 10, drop: str | None = None) -> tuple[Path, np.ndarray]:
    """A small archive in the official python format: 5 training batches and a test batch.
    Returns the path and all training images in batch order."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    train = []
    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate(names):
            images, labels = class_images(per_batch // 10, seed=100 + i)
            if name != "test_batch":
                train.append(images)
            if name == drop:
                continue
            data = official_batch(images, labels)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, np.concatenate(train)


@pytest.fixture(scope="session")
def tiny_official(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_official(tmp_path_factory.mktemp("official") / "tiny-cifar-python.tar.gz")[0]


def subprocess_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, FASTRES_CACHE=str(cache))
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return env


def coordinate_images(n: int) -> Split:
    """Channel 0 holds each pixel's row, channel 1 its column (both + 100); the label is the
    image's index, so batches can be traced back to images."""
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    img = np.zeros((n, 32, 32, 3), np.uint8)
    img[..., 0] = rows + 100
    img[..., 1] = cols + 100
    return Split(img, np.arange(n))


def decode(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Recover (dy, dx, flip) of each output image from the coordinates at its centre."""
    px = torch.round(x * 255).to(torch.int64)
    r, c0, c1 = px[:, 0, 16, 16] - 100, px[:, 1, 16, 16] - 100, px[:, 1, 16, 17] - 100
    flip = c1 < c0
    dx = torch.where(flip, c0 - 15, c0 - 16)
    return (r - 16).numpy(), dx.numpy(), flip.numpy()


DETERMINISTIC = ("iter", "epoch", "lr", "train_loss", "train_error", "test_error", "val_error")


def tiny_config(data: Path, out: Path, **kw) -> RunConfig:
    base = dict(model="resnet8", shortcut="A", iters=30, milestones=(15, 25), batch_size=32, data=str(data),
                log_every=5, eval_every=10, checkpoint_every=10, out=str(out), progress="none", device="cpu")
    return RunConfig(**{**base, **kw})


def deterministic(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k in DETERMINISTIC} for m in metrics]
