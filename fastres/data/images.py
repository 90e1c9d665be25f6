"""Encoded image trees and archives: `train/<class>/*.jpg|png` and `test/<class>/*`.

The layout may sit in a folder, in one `.tar`/`.tar.gz` holding both splits, or in a
folder with `train.tar.gz` and `test.tar.gz` (the shared CIFAR-10 JPEG copy).
"""

from __future__ import annotations

import io
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fastres.data.dataset import CLASSES, IMAGE_SHAPE, EncodedSplit, Split, Splits
from fastres.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLIT_NAMES = ("train", "test")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES)


def split_archives(folder: Path) -> dict[str, Path]:
    """`train.tar.gz` and `test.tar.gz` (or .tar/.tgz) in a folder, by split."""
    found = {}
    for split in SPLIT_NAMES:
        for suffix in ARCHIVE_SUFFIXES:
            if (folder / f"{split}{suffix}").is_file():
                found[split] = folder / f"{split}{suffix}"
    return found


def _classify(name: str) -> tuple[str, int] | None:
    """(split, label) of an image path ending in `<split>/<class>/<file>`, else None."""
    parts = name.replace("\\", "/").split("/")
    if len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_SUFFIXES) or parts[-1].startswith("."):
        return None
    split, cls = parts[-3], parts[-2]
    if split not in SPLIT_NAMES:
        return None
    if cls not in CLASSES:
        raise DataError(f"{name}: unknown class {cls!r}; expected the CIFAR-10 classes {', '.join(CLASSES)}")
    return split, CLASSES.index(cls)


def _walk_tree(root: Path) -> Iterator[tuple[str, bytes]]:
    for split in SPLIT_NAMES:
        for path in sorted((root / split).rglob("*")):
            if path.is_file():
                yield str(path.relative_to(root)), path.read_bytes()


def _walk_archive(path: Path) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile() and _classify(member.name) is not None:
                    yield member.name, tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path}: unreadable archive ({e}); it is truncated or corrupt") from None


def read_encoded(sources: list[Path]) -> Splits:
    """Collect the encoded files of both splits, sorted by split, class and file name."""
    found: dict[str, list[tuple[int, str, bytes]]] = {s: [] for s in SPLIT_NAMES}
    for source in sources:
        for name, data in (_walk_archive(source) if is_archive(source) else _walk_tree(source)):
            tag = _classify(name)
            if tag is not None:
                found[tag[0]].append((tag[1], name, data))
    splits = {}
    for split, items in found.items():
        if not items:
            raise DataError(f"{', '.join(map(str, sources))}: no {split}/<class>/*.jpg|png images found")
        items.sort(key=lambda t: (t[0], t[1]))
        missing = sorted(set(range(len(CLASSES))) - {label for label, _, _ in items})
        if missing:
            raise DataError(f"{split}: no images of class {', '.join(CLASSES[i] for i in missing)}")
        splits[split] = EncodedSplit([np.frombuffer(d, dtype=np.uint8) for _, _, d in items],
                                     np.array([label for label, _, _ in items], dtype=np.int64))
    return Splits(splits["train"], splits["test"])


def decode_file(data: np.ndarray, name: str = "image") -> np.ndarray:
    """One encoded file to a (32, 32, 3) uint8 array; anything else is a DataError."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as img:
            pixels = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{name}: cannot decode image ({e})") from None
    if pixels.shape != IMAGE_SHAPE:
        raise DataError(f"{name}: image is {pixels.shape[1]}x{pixels.shape[0]}, expected 32x32")
    return pixels


def decode(split: EncodedSplit, name: str) -> Split:
    """Decode every file of a split with Pillow (about 12 s for all 60k CIFAR images on one
    core; the result is cached, so this happens once)."""
    images = np.stack([decode_file(f, f"{name} image {i}") for i, f in enumerate(split.files)])
    return Split(images, split.labels)
