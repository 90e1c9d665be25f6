"""Find CIFAR-10 or CIFAR-100 from `--data` (or the cache), load it, and cache the decoded arrays."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastres import atomic
from fastres.data import images, official
from fastres.data.dataset import DATASETS, Cifar, Split, Splits, check_split
from fastres.data.tars import open_tar
from fastres.errors import DataError, RunError

CACHE_FORMAT = 2  # bump when the cached arrays' layout changes (2: with a checksum)


def default_cache_dir() -> Path:
    """`$FASTRES_CACHE`, else `$XDG_CACHE_HOME/fastres`, else `~/.cache/fastres`."""
    if os.environ.get("FASTRES_CACHE"):
        return Path(os.environ["FASTRES_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastres"


CACHE_WAY_OUT = "set FASTRES_CACHE (or XDG_CACHE_HOME) to a folder fastres may write"


def file_in_place(folder: Path) -> Path | None:
    """The file (or dangling link) standing where `folder` or a folder above it should be:
    then no cache can be made there."""
    for path in (folder, *folder.parents):
        if os.path.lexists(path):
            return None if os.path.isdir(path) else path
    return None


def check_writable_cache(folder: Path) -> None:
    """Before a download into the cache: a cache folder that cannot be made or written (a file
    in its place or above it, no permission, a read-only disk) is one line naming it and the
    ways out, not a traceback from deep in the download."""
    blocking = file_in_place(folder)
    if blocking is not None:
        raise RunError(_unusable_cache(folder, f"{blocking} is a file, not a folder"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # writing is the one sure test (permissions, ACLs, read-only)
    except OSError as e:
        raise RunError(_unusable_cache(folder, e.strerror or str(e))) from None


def _unusable_cache(folder: Path, why: str) -> str:
    return (f"the cache folder {folder} cannot hold the official archive ({why}): {CACHE_WAY_OUT}, or pass "
            "--data PATH to a copy of the data")


@dataclass(frozen=True)
class Source:
    """Where the data is: the official archive, or encoded image trees/archives."""

    kind: str  # "official" or "images"
    paths: tuple[Path, ...]
    named: str = ""  # `--data` as the user wrote it: what result files record, never a resolved path
    splits: tuple[str, ...] = images.SPLIT_NAMES  # ("test",): evaluation, which needs no training set
    dataset: str = "cifar10"

    def describe(self) -> str:
        return f"{self.kind}: {self.named or ', '.join(p.name for p in self.paths)}"


def _archive_dataset(path: Path) -> Cifar | None:
    """The CIFAR whose official archive this is (by name, or by the folder of its first
    member), or None for an archive of images."""
    named = next((d for d in DATASETS.values() if path.name == d.archive), None)
    if named is not None:
        return named
    with open_tar(path) as tar:
        first = tar.next()
    return None if first is None else official.dataset_of_folder(first.name.split("/")[0])


def _same(found: Cifar, wanted: Cifar, path: Path) -> None:
    if found is not wanted:
        raise DataError(f"--data {path} holds {found.name}, not {wanted.name}: pass --dataset {found.name}, or other "
                        "data")


def resolve(data: str | Path | None, cache_dir: Path | None = None, url: str | None = None,
            splits: tuple[str, ...] = images.SPLIT_NAMES, dataset: str = "cifar10") -> Source:
    """Map `--data` to a source of `dataset` (cifar10 or cifar100); with no `--data`, its
    official archive in the cache, downloaded on first use. With `splits=("test",)` an
    image source needs no training images (a folder with test/ or test.tar.gz alone)."""
    cifar = DATASETS[dataset]
    source = _resolve(data, cache_dir or default_cache_dir(), url or cifar.url, splits, cifar)
    return dataclasses.replace(source, splits=splits if source.kind == "images" else source.splits, dataset=dataset)


def _resolve(data: str | Path | None, cache_dir: Path, url: str, splits: tuple[str, ...], cifar: Cifar) -> Source:
    if data is None:
        archive = cache_dir / cifar.archive
        if not archive.is_file():
            check_writable_cache(cache_dir)
            official.download(url, archive, cifar.archive_md5)
        return Source("official", (archive,), f"official {cifar.name} archive in the fastres cache")
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder")
    if path.is_file():
        if not images.is_archive(path):
            raise DataError(f"--data {path}: expected {cifar.archive}, a .tar/.tar.gz of "
                            "train/<class>/ and test/<class>/ images, or a folder")
        found = _archive_dataset(path)
        if found is None:
            return Source("images", (path,), str(data))
        _same(found, cifar, path)
        return Source("official", (path,), str(data))
    for d in DATASETS.values():
        if (path / d.archive).is_file() and d is cifar:
            return Source("official", (path / d.archive,), str(data))
    for folder in (path, *(path / d.folder for d in DATASETS.values())):  # an extracted folder, or a root holding it
        found = official.dataset_of_folder(folder.name) if folder.is_dir() else None
        if found is not None:
            _same(found, cifar, path)
            return Source("official", (folder,), str(data))
    if all((path / split).is_dir() for split in splits):
        return Source("images", (path,), str(data))
    archives = images.split_archives(path)
    if all(split in archives for split in splits):
        return Source("images", tuple(archives[split] for split in splits), str(data))
    raise DataError(f"--data {path}: no {cifar.name} there; expected {cifar.archive}, "
                    f"{cifar.folder}/, train/ and test/ image folders, or train.tar.gz and test.tar.gz")


# A decoded entry is named `<source>-<content>.npz`: a hash of what the source is (kind, data
# set, splits, resolved paths), then one of the files it reads (names, sizes, modification
# times). Writing an entry removes the older ones of its source, so the cache holds one per
# source. The patterns name what fastres writes in `<cache>/decoded/`, and nothing else is
# ever removed there (fastres.cache).
ENTRY = re.compile(r"[0-9a-f]{12}-[0-9a-f]{16}\.npz")
LEGACY_ENTRY = re.compile(r"[0-9a-f]{20}\.npz")  # the earlier name: one hash of source and files
TEMPORARY = re.compile(rf"\.(?:{ENTRY.pattern}|{LEGACY_ENTRY.pattern})\.[a-z0-9_]+\.tmp")  # atomic's, left by a kill


def fingerprint(source: Source) -> str:
    """The name (without .npz) of the source's decoded entry: what it is, then what it holds."""
    return f"{_identity(source)}-{_content(source)}"


def _identity(source: Source) -> str:
    h = hashlib.sha256(f"{source.kind} {source.dataset} {source.splits}".encode())
    for root in source.paths:
        h.update(os.fsencode(root.resolve()) + b"\n")
    return h.hexdigest()[:12]


def _content(source: Source) -> str:
    """A stamp of exactly the files a load reads, so files beside them (a run directory
    written inside the data tree) cannot change it."""
    h = hashlib.sha256(f"{CACHE_FORMAT}".encode())
    for root in source.paths:
        for f in _files_read(source, root):
            h.update(_stamp(f, root))
    return h.hexdigest()[:16]


def _files_read(source: Source, root: Path) -> list[Path]:
    """The files a load of `root` reads: the archive itself, an extracted folder's batch
    files, or an image tree's images."""
    if root.is_file():
        return [root]
    if source.kind == "official":
        return official.folder_files(root, DATASETS[source.dataset])
    return images.scan_tree(root, source.splits)[0]


def _stamp(path: Path, root: Path) -> bytes:
    name = os.fsencode(path.relative_to(root))
    try:
        st = path.stat()
    except OSError:  # missing or unreadable: reading it will say so
        return name + b" unreadable\n"
    return name + f" {st.st_size} {st.st_mtime_ns}\n".encode()


def _read(source: Source, progress: str) -> Splits:
    cifar = DATASETS[source.dataset]
    if source.kind == "official" and source.paths[0].is_dir():
        return official.read_folder(source.paths[0], cifar)
    if source.kind == "official":
        path = source.paths[0]
        # The real archive is held to its published md5; small archives built the same way
        # (tests, subsets) are read as they are.
        md5 = cifar.archive_md5 if path.name == cifar.archive else None
        return official.read_archive(path, md5, cifar)
    return images.read_decoded(list(source.paths), source.splits, cifar.classes, progress)


ARRAYS = ("train_x", "train_y", "test_x", "test_y")


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """BLAKE2 of every cached array's shape, type and bytes (about 0.3 s for CIFAR-10)."""
    h = hashlib.blake2b(digest_size=20)
    for name in ARRAYS:
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name} {a.dtype} {a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8))  # the bytes themselves, no copy
    return h.hexdigest()


def _cached(cache: Path, instead: str = "rebuilding it from the source") -> Splits | None:
    """The cached splits if the file is whole and its checksum holds; a damaged file (a
    kill while it was copied, a bad disk) is reported in one line, with what is done
    `instead`, and never used."""
    try:
        with np.load(cache) as z:
            arrays = {name: z[name] for name in ARRAYS}
            stored = str(z["checksum"])
        if checksum(arrays) != stored:
            raise ValueError("checksum mismatch")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        print(f"fastres: note: the decoded-data cache {cache} is damaged ({e}); {instead}", file=sys.stderr)
        return None
    return Splits(Split(arrays["train_x"], arrays["train_y"]), Split(arrays["test_x"], arrays["test_y"]))


def _decoded_entry(key: str, cache_dir: Path | None = None) -> Path:
    """The decoded cache's file for the source whose fingerprint is `key` (it may not exist)."""
    return (cache_dir or default_cache_dir()) / "decoded" / f"{key}.npz"


def load(source: Source, cache_dir: Path | None = None, key: str | None = None, progress: str = "none",
         whole: str | None = None) -> Splits:
    """Decoded uint8 splits, from the cache when this source was decoded before; `key` is
    the source's fingerprint when the caller has it already; `progress` ("rich", "plain",
    "none"): how the decoding of an image source (a cache miss) is shown. `whole`: for a
    test-only source, the fingerprint of the whole set that reads the same test files; its
    entry, left by a training run, gives the test split (the training arrays are let go)
    instead of a decode of its own."""
    cache = _decoded_entry(key or fingerprint(source), cache_dir)
    if cache.is_file() and (splits := _cached(cache)) is not None:
        return splits
    if whole is not None and (entry := _decoded_entry(whole, cache_dir)).is_file() and \
            (both := _cached(entry, "reading the test images from the source instead")) is not None:
        return Splits(Split(both.train.images[:0].copy(), both.train.labels[:0].copy()), both.test)  # no view
    splits = _read(source, progress)
    for name in source.splits:
        check_split(getattr(splits, name), name, DATASETS[source.dataset].classes)
    arrays = dict(train_x=splits.train.images, train_y=splits.train.labels, test_x=splits.test.images,
                  test_y=splits.test.labels)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic.save_npz(cache, **arrays, checksum=np.array(checksum(arrays)))
    except (OSError, RunError) as e:
        print(f"fastres: warning: cannot cache decoded data in {cache.parent} ({e}); reading the source "
              "again next time", file=sys.stderr)
    else:
        _remove_older(cache)
    return splits


def _remove_older(entry: Path) -> None:
    """Remove the entries of the same source written before `entry` (its files have changed
    since), so the cache holds one entry per source."""
    source = entry.name.split("-")[0]
    for old in entry.parent.glob(f"{source}-*.npz"):
        if old != entry and ENTRY.fullmatch(old.name):
            try:
                old.unlink(missing_ok=True)
            except OSError as e:
                print(f"fastres: warning: cannot remove the outdated cache entry {old} ({e.strerror or e})",
                      file=sys.stderr)


def load_encoded(source: Source) -> Splits | None:
    """The encoded files of an image source (for GPU decoding), or None for raw arrays."""
    if source.kind != "images":
        return None
    return images.read_encoded(list(source.paths), source.splits, DATASETS[source.dataset].classes)
