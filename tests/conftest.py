"""Shared fixtures: tiny CIFAR-10 datasets in every supported format, built by the tests."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastres.data.dataset import CLASSES

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
