"""Find CIFAR-10 from `--data` (or the cache), load it, and cache the decoded arrays."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastres import atomic
from fastres.data import images, official
from fastres.data.dataset import Split, Splits, check_split
from fastres.errors import DataError, RunError

CACHE_FORMAT = 2  # bump when the cached arrays' layout changes (2: with a checksum)


def default_cache_dir() -> Path:
    """`$FASTRES_CACHE`, else `$XDG_CACHE_HOME/fastres`, else `~/.cache/fastres`."""
    if os.environ.get("FASTRES_CACHE"):
        return Path(os.environ["FASTRES_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastres"


@dataclass(frozen=True)
class Source:
    """Where the data is: the official archive, or encoded image trees/archives."""

    kind: str  # "official" or "images"
    paths: tuple[Path, ...]
    named: str = ""  # `--data` as the user wrote it: what result files record, never a resolved path
    splits: tuple[str, ...] = images.SPLIT_NAMES  # ("test",): evaluation, which needs no training set

    def describe(self) -> str:
        return f"{self.kind}: {self.named or ', '.join(p.name for p in self.paths)}"


def _archive_holds_batches(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*") as tar:
            first = tar.next()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: unreadable archive ({e}); it is truncated or corrupt") from None
    return first is not None and first.name.split("/")[0] == official.BATCH_DIR


def resolve(data: str | Path | None, cache_dir: Path | None = None, url: str = official.ARCHIVE_URL,
            splits: tuple[str, ...] = images.SPLIT_NAMES) -> Source:
    """Map `--data` to a source; with no `--data`, the official archive in the cache,
    downloaded on first use. With `splits=("test",)` an image source needs no training
    images (a folder with test/ or test.tar.gz alone will do)."""
    source = _resolve(data, cache_dir or default_cache_dir(), url, splits)
    return dataclasses.replace(source, splits=splits) if source.kind == "images" else source


def _resolve(data: str | Path | None, cache_dir: Path, url: str, splits: tuple[str, ...]) -> Source:
    if data is None:
        archive = cache_dir / official.ARCHIVE_NAME
        if not archive.is_file():
            official.download(url, archive)
        return Source("official", (archive,), "official archive in the fastres cache")
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder")
    if path.is_file():
        if not images.is_archive(path):
            raise DataError(f"--data {path}: expected {official.ARCHIVE_NAME}, a .tar/.tar.gz of "
                            "train/<class>/ and test/<class>/ images, or a folder")
        if path.name == official.ARCHIVE_NAME or _archive_holds_batches(path):
            return Source("official", (path,), str(data))
        return Source("images", (path,), str(data))
    if (path / official.ARCHIVE_NAME).is_file():
        return Source("official", (path / official.ARCHIVE_NAME,), str(data))
    for folder in (path, path / official.BATCH_DIR):  # the extracted folder, or a root holding it
        if folder.name == official.BATCH_DIR and folder.is_dir():
            return Source("official", (folder,), str(data))
    if all((path / split).is_dir() for split in splits):
        return Source("images", (path,), str(data))
    archives = images.split_archives(path)
    if all(split in archives for split in splits):
        return Source("images", tuple(archives[split] for split in splits), str(data))
    raise DataError(f"--data {path}: no CIFAR-10 there; expected {official.ARCHIVE_NAME}, "
                    f"{official.BATCH_DIR}/, train/ and test/ image folders, or train.tar.gz and test.tar.gz")


def fingerprint(source: Source) -> str:
    """Identify a source by its files' paths, sizes and modification times."""
    h = hashlib.sha256(f"{CACHE_FORMAT} {source.kind} {source.splits}".encode())
    for root in source.paths:
        files = (official.folder_files(root) if source.kind == "official" else images.tree_files(root, source.splits))
        for f in [root] if root.is_file() else [f for f in files if f.exists()]:
            st = f.stat()
            h.update(os.fsencode(f.resolve()) + f" {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _read(source: Source) -> Splits:
    if source.kind == "official" and source.paths[0].is_dir():
        return official.read_folder(source.paths[0])
    if source.kind == "official":
        path = source.paths[0]
        # The real archive is held to its published md5; small archives built the same way
        # (tests, subsets) are read as they are.
        md5 = official.ARCHIVE_MD5 if path.name == official.ARCHIVE_NAME else None
        return official.read_archive(path, md5)
    encoded = images.read_encoded(list(source.paths), source.splits)
    return Splits(images.decode(encoded.train, "train"), images.decode(encoded.test, "test"))


ARRAYS = ("train_x", "train_y", "test_x", "test_y")


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """BLAKE2 of every cached array's shape, type and bytes (about 0.3 s for CIFAR-10)."""
    h = hashlib.blake2b(digest_size=20)
    for name in ARRAYS:
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name} {a.dtype} {a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8))  # the bytes themselves, no copy
    return h.hexdigest()


def _cached(cache: Path) -> Splits | None:
    """The cached splits if the file is whole and its checksum holds; a damaged file (a
    kill while it was copied, a bad disk) is reported in one line and rebuilt, never used."""
    try:
        with np.load(cache) as z:
            arrays = {name: z[name] for name in ARRAYS}
            stored = str(z["checksum"])
        if checksum(arrays) != stored:
            raise ValueError("checksum mismatch")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        print(f"fastres: note: the decoded-data cache {cache} is damaged ({e}); rebuilding it from the source",
              file=sys.stderr)
        return None
    return Splits(Split(arrays["train_x"], arrays["train_y"]), Split(arrays["test_x"], arrays["test_y"]))


def load(source: Source, cache_dir: Path | None = None, key: str | None = None) -> Splits:
    """Decoded uint8 splits, from the cache when this source was decoded before; `key` is
    the source's fingerprint when the caller has it already."""
    cache = (cache_dir or default_cache_dir()) / "decoded" / f"{key or fingerprint(source)}.npz"
    if cache.is_file() and (splits := _cached(cache)) is not None:
        return splits
    splits = _read(source)
    for name in source.splits:
        check_split(getattr(splits, name), name)
    arrays = dict(train_x=splits.train.images, train_y=splits.train.labels, test_x=splits.test.images,
                  test_y=splits.test.labels)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic.save_npz(cache, **arrays, checksum=np.array(checksum(arrays)))
    except (OSError, RunError) as e:
        print(f"fastres: warning: cannot cache decoded data in {cache.parent} ({e}); reading the source "
              "again next time", file=sys.stderr)
    return splits


def load_encoded(source: Source) -> Splits | None:
    """The encoded files of an image source (for GPU decoding), or None for raw arrays."""
    return images.read_encoded(list(source.paths), source.splits) if source.kind == "images" else None
