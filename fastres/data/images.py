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


def _image_path(name: str) -> bool:
    """Whether a path has the shape `<split>/<class>/<file>.jpg|png` (class not checked)."""
    parts = name.replace("\\", "/").split("/")
    return (len(parts) >= 3 and parts[-1].lower().endswith(IMAGE_SUFFIXES) and not parts[-1].startswith(".")
            and parts[-3] in SPLIT_NAMES)


def _classify(name: str, classes: tuple[str, ...] = CLASSES) -> tuple[str, int] | None:
    """(split, label) of an image path ending in `<split>/<class>/<file>`, else None."""
    if not _image_path(name):
        return None
    split, cls = name.replace("\\", "/").split("/")[-3:-1]
    if cls not in classes:
        listed = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
        raise DataError(f"{name}: unknown class {cls!r}; expected the {len(classes)} classes {listed} "
                        "(is it the other CIFAR? see --dataset)")
    return split, classes.index(cls)


def tree_files(root: Path, splits: tuple[str, ...] = SPLIT_NAMES) -> list[Path]:
    """The files of an image tree's split folders, sorted; nothing beside them is walked
    (a stray folder of many files next to train/ and test/ costs nothing)."""
    return sorted(p for split in splits for p in (root / split).rglob("*") if p.is_file())


def _walk_tree(root: Path, splits: tuple[str, ...]) -> Iterator[tuple[str, bytes]]:
    for path in tree_files(root, splits):
        yield str(path.relative_to(root)), path.read_bytes()


def _walk_archive(path: Path) -> Iterator[tuple[str, bytes]]:
    """Image members of a tar, read in memory: nothing is ever extracted to disk. A member
    whose name could escape a folder, or an image name that is a link or a device, is
    refused in one line."""
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = member.name.replace("\\", "/")
                if name.startswith("/") or ".." in name.split("/"):
                    raise DataError(f"{path}: member {member.name!r} has an unsafe name (absolute or with '..')")
                if not _image_path(name):
                    continue
                if not member.isfile():
                    raise DataError(f"{path}: member {member.name!r} is a link or device, not an image file")
                yield name, tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path}: unreadable archive ({e}); it is truncated or corrupt") from None


def read_encoded(sources: list[Path], splits: tuple[str, ...] = SPLIT_NAMES,
                 classes: tuple[str, ...] = CLASSES) -> Splits:
    """Collect the encoded files of the wanted splits (both, or the test split alone for
    evaluation), sorted by split, class and file name; a split not wanted is empty."""
    found: dict[str, list[tuple[int, str, bytes]]] = {s: [] for s in splits}
    for source in sources:
        for name, data in (_walk_archive(source) if is_archive(source) else _walk_tree(source, splits)):
            tag = _classify(name, classes)
            if tag is not None and tag[0] in found:
                found[tag[0]].append((tag[1], name, data))
    read = {}
    for split, items in found.items():
        if not items:
            raise DataError(f"{', '.join(map(str, sources))}: no {split}/<class>/*.jpg|png images found")
        items.sort(key=lambda t: (t[0], t[1]))
        missing = sorted(set(range(len(classes))) - {label for label, _, _ in items})
        if missing:
            raise DataError(f"{split}: no images of class {', '.join(classes[i] for i in missing[:5])}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        read[split] = EncodedSplit([np.frombuffer(d, dtype=np.uint8) for _, _, d in items],
                                   np.array([label for label, _, _ in items], dtype=np.int64))
    return Splits(read.get("train", EncodedSplit([], np.zeros(0, np.int64))), read["test"])


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow image as uint8 RGB (H, W, 3), by the rules `decode_file` states."""
    if img.mode.startswith("I"):  # 16-bit grayscale (I;16, or I as older Pillow opens it)
        high = np.clip(np.asarray(img).astype(np.int64) >> 8, 0, 255).astype(np.uint8)
        return np.repeat(high[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def decode_file(data: np.ndarray, name: str = "image") -> np.ndarray:
    """One encoded file to a (32, 32, 3) uint8 array; anything else is a DataError.

    Modes: RGB as it is; grayscale (L) repeated on the three channels; palette (P) through
    its palette; RGBA, LA and CMYK to RGB with the alpha channel dropped (no compositing);
    16-bit grayscale (I;16, or I as older Pillow opens it) scaled to 8 bits (the high byte)
    and repeated.
    The size is checked before any pixel is decoded, so a decompression bomb costs nothing."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as img:
            if img.size != IMAGE_SHAPE[:2]:
                raise DataError(f"{name}: image is {img.size[0]}x{img.size[1]}, expected 32x32")
            pixels = to_rgb(img)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
    return pixels


def decode(split: EncodedSplit, name: str) -> Split:
    """Decode every file of a split with Pillow (about 12 s for all 60k CIFAR images on one
    core; the result is cached, so this happens once)."""
    if not split.files:  # a split not read (evaluation reads the test split alone)
        return Split(np.zeros((0, *IMAGE_SHAPE), np.uint8), split.labels)
    images = np.stack([decode_file(f, f"{name} image {i}") for i, f in enumerate(split.files)])
    return Split(images, split.labels)
