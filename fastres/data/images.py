"""Encoded image trees and archives: `train/<class>/*.jpg|png` and `test/<class>/*`.

The layout may sit in a folder, in one `.tar`/`.tar.gz` holding both splits, or in a
folder with `train.tar.gz` and `test.tar.gz` (the shared CIFAR-10 JPEG copy). What is read
is exactly `<split>/<class>/<name>.jpg|jpeg|png` below the folder or archive root, each file
checked by its size before a byte of it is read, and decoded in chunks, on all cores, as it
is read.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import sys
import tarfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from fastres.data import pool
from fastres.data.dataset import CLASSES, IMAGE_SHAPE, EncodedSplit, Split, Splits, check_classes
from fastres.data.tars import open_tar
from fastres.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLIT_NAMES = ("train", "test")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# One image file at most: a 32x32 RGB image is 3,072 bytes of pixels (the shared JPEG copy's
# files are about 900 bytes); 1 MiB leaves room for metadata such as EXIF (at most 64 KiB a
# segment) and ICC profiles, and refuses a file of gigabytes before any of it is read.
MAX_IMAGE_BYTES = 1 << 20
T = TypeVar("T")


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


def _read_from(source: Path, splits: tuple[str, ...]) -> tuple[str, ...]:
    """The splits to read from a source: a split's own archive (`train.tar.gz`) holds that
    split alone, so a `test/` inside it is another file, never more test images."""
    own = next((split for split in SPLIT_NAMES for suffix in ARCHIVE_SUFFIXES if source.name == split + suffix), None)
    return splits if own is None else tuple(s for s in splits if s == own)


def _parts(name: str) -> list[str]:
    """A relative path or tar member name as its parts; `./train/x` is `train/x`."""
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _layout(parts: list[str], splits: tuple[str, ...]) -> str | None:
    """"image" for `<split>/<class>/<name>.jpg|jpeg|png`, "other" for any other file under a
    wanted split folder (not read, but counted), None for what is not looked at: hidden
    entries (.DS_Store) and everything outside the split folders."""
    if not parts or parts[0] not in splits or any(p.startswith(".") for p in parts):
        return None
    return "image" if len(parts) == 3 and parts[2].lower().endswith(IMAGE_SUFFIXES) else "other"


def _classify(name: str, classes: tuple[str, ...] = CLASSES) -> tuple[str, int]:
    """(split, label) of an image path `<split>/<class>/<file>`; an unknown class is refused."""
    split, cls, _ = _parts(name)
    if cls not in classes:
        listed = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
        raise DataError(f"{name}: unknown class {cls!r}; expected the {len(classes)} classes {listed} "
                        "(is it the other CIFAR? see --dataset)")
    return split, classes.index(cls)


def _listing(folder: str | Path) -> list[os.DirEntry]:
    """A folder's entries, sorted, hidden ones left out."""
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"{folder}: cannot list the folder ({e.strerror or e})") from None


def _files_below(entry: os.DirEntry) -> list[str]:
    """The entry if it is a file, or the files of the folder it is (links not followed, hidden
    entries left out): what lies where no image may be, counted, never read."""
    if not entry.is_dir(follow_symlinks=False):
        return [entry.path]
    found = []
    for top, dirs, files in os.walk(entry.path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(top, f) for f in files if not f.startswith(".")]
    return found


def scan_tree(root: Path, splits: tuple[str, ...] = SPLIT_NAMES) -> tuple[list[Path], list[str]]:
    """The image files of a tree (`<split>/<class>/<name>.jpg|jpeg|png`, sorted) and the other
    files under its split folders (relative names, sorted), which are not read. Only the split
    folders are walked (a stray folder of many files beside train/ and test/ costs nothing);
    a split or class folder may be a link to a folder."""
    found: list[Path] = []
    others: list[str] = []
    for split in splits:
        for cls in _listing(root / split):
            if not cls.is_dir():
                others.append(cls.path)
                continue
            for entry in _listing(cls.path):
                if entry.name.lower().endswith(IMAGE_SUFFIXES):
                    found.append(Path(entry.path))
                else:
                    others += _files_below(entry)
    return sorted(found), sorted(os.path.relpath(p, root) for p in others)


_KINDS = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "device"),
          (stat.S_ISBLK, "device"))


def _check_file(path: Path, limit: int) -> None:
    """Refuse in one line, by stat alone, anything but a regular file (or a link to one) of at
    most `limit` bytes. Nothing is opened, so a FIFO cannot hang the read and
    a file of gigabytes costs nothing."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: {'a dangling link' if path.is_symlink() else 'no such file'}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((what for test, what in _KINDS if test(st.st_mode)), "special file")
        raise DataError(f"{path}: is {'a link to ' if path.is_symlink() else ''}a {kind}, not an image file")
    if st.st_size > limit:
        raise DataError(f"{path}: {st.st_size:,} bytes, over the bound of {limit:,} bytes for one image file")


def read_file(path: Path, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of an image file, checked by `_check_file` first, and never more than `limit`
    of them (a file may grow after stat, and /proc files report a size of 0)."""
    _check_file(path, limit)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > limit:
        raise DataError(f"{path}: more than the bound of {limit:,} bytes for one image file")
    return data


def _walk_tree(root: Path, splits: tuple[str, ...], others: list[str]) -> Iterator[tuple[str, str, bytes]]:
    """(name, where, bytes) of a tree's image files, one at a time; the other files' names go
    to `others`."""
    found, skipped = scan_tree(root, splits)
    others += skipped
    for path in found:
        yield os.path.relpath(path, root), str(path), read_file(path)


def _member_name(path: Path, member: tarfile.TarInfo) -> str:
    name = member.name.replace("\\", "/")
    if name.startswith("/") or ".." in name.split("/"):
        raise DataError(f"{path}: member {member.name!r} has an unsafe name (absolute or with '..')")
    return "/".join(_parts(name))


def _walk_archive(path: Path, splits: tuple[str, ...], others: list[str]) -> Iterator[tuple[str, str, bytes]]:
    """(name, where, bytes) of a tar's image members, one at a time, read in memory: nothing
    is ever extracted to disk. A member whose name could escape a folder, an image name that
    is a link or a device, appears twice, or is over MAX_IMAGE_BYTES by its header, is refused
    in one line before any of it is read."""
    seen: set[str] = set()
    with open_tar(path) as tar:
        for member in tar:
            name = _member_name(path, member)
            layout = _layout(name.split("/"), splits)
            if layout == "other" and not member.isdir():
                others.append(name)
            if layout != "image":
                continue
            if not member.isfile():
                raise DataError(f"{path}: member {member.name!r} is a link or device, not an image file")
            if name in seen:
                raise DataError(f"{path}: member {member.name!r} appears twice; each image must be there once")
            seen.add(name)
            if member.size > MAX_IMAGE_BYTES:
                raise DataError(f"{path}: member {member.name!r} is {member.size:,} bytes, over the bound of "
                                f"{MAX_IMAGE_BYTES:,} bytes for one image file")
            yield name, f"{path}: member {name}", tar.extractfile(member).read()


Found = dict[str, list[tuple[int, str, T]]]
# Images a decoding worker gets at a time, and the encoded bytes that end a chunk sooner: a
# chunk of the JPEG copy is 256 files of about 900 bytes. At most AHEAD_PER_WORKER chunks a
# worker are read ahead of the decoding, so what is held encoded stays under
# workers * AHEAD_PER_WORKER * (CHUNK_BYTES + MAX_IMAGE_BYTES), whatever the archive holds.
CHUNK_IMAGES, CHUNK_BYTES, AHEAD_PER_WORKER = 256, 4 << 20, 2


def _images(sources: list[Path], splits: tuple[str, ...], classes: tuple[str, ...],
            others: list[str]) -> Iterator[tuple[str, int, str, str, bytes]]:
    """(split, label, name, where, bytes) of each image of the wanted splits, one at a time,
    in reading order; the files not read go to `others`."""
    for source in sources:
        walk = _walk_archive if is_archive(source) else _walk_tree
        for name, where, data in walk(source, _read_from(source, splits), others):
            split, label = _classify(name, classes)
            yield split, label, name, where, data


def _splits(found: Found, sources: list[Path], classes: tuple[str, ...],
            make: Callable[[list[T], np.ndarray], Split | EncodedSplit]) -> Splits:
    """Each wanted split sorted by class and file name, every class present; a split not
    wanted is empty."""
    read = {}
    for split, items in found.items():
        if not items:
            raise DataError(f"{', '.join(map(str, sources))}: no {split}/<class>/*.jpg|jpeg|png images found")
        items.sort(key=lambda t: (t[0], t[1]))
        labels = np.array([label for label, _, _ in items], dtype=np.int64)
        check_classes(labels, split, classes)
        read[split] = make([x for _, _, x in items], labels)
    empty = make([], np.zeros(0, np.int64))
    return Splits(read.get("train", empty), read["test"])


def read_encoded(sources: list[Path], splits: tuple[str, ...] = SPLIT_NAMES,
                 classes: tuple[str, ...] = CLASSES) -> Splits:
    """The encoded files of the wanted splits (both, or the test split alone for evaluation),
    for decoders such as DALI's that take the files themselves."""
    found: Found = {s: [] for s in splits}
    for split, label, name, _, data in _images(sources, splits, classes, []):
        found[split].append((label, name, np.frombuffer(data, np.uint8)))
    return _splits(found, sources, classes, EncodedSplit)


def read_decoded(sources: list[Path], splits: tuple[str, ...] = SPLIT_NAMES, classes: tuple[str, ...] = CLASSES,
                 progress: str = "none", workers: int | None = None) -> Splits:
    """The wanted splits decoded with Pillow, on `workers` processes (default: every core this
    process may use; the result is cached, so this happens once), shown as `progress` says
    (`_decoding`).
    Files are read here, one at a time and checked before they are read, and decoded in
    chunks as they arrive: the result is the serial decode's, byte for byte, and so is the
    first error. Files under the split folders that are not images by the layout are named
    in one note."""
    found: Found = {s: [] for s in splits}
    others: list[str] = []
    keys: deque[list[tuple[str, int, str]]] = deque()  # each chunk's images, in the order of the results

    def chunks() -> Iterator[list[tuple[str, bytes]]]:
        for chunk in _chunked(_images(sources, splits, classes, others)):
            keys.append([(split, label, name) for split, label, name, _, _ in chunk])
            yield [(where, data) for _, _, _, where, data in chunk]

    workers = pool.cores() if workers is None else workers
    with _decoding(sources, splits, progress) as advance:
        for decoded in pool.ordered_map(decode_files, chunks(), workers, AHEAD_PER_WORKER * workers):
            for (split, label, name), pixels in zip(keys.popleft(), decoded, strict=True):
                found[split].append((label, name, pixels))
            advance(len(decoded))
    if others:
        many = len(others) > 1
        print(f"fastres: note: {len(others)} file{'s' if many else ''} under {' and '.join(s + '/' for s in splits)} "
              f"{'are' if many else 'is'} not <split>/<class>/<name>.jpg|jpeg|png and {'were' if many else 'was'} "
              f"not read (e.g. {others[0]})", file=sys.stderr)
    return _splits(found, sources, classes,
                   lambda arrays, labels: Split(np.array(arrays, np.uint8).reshape(-1, *IMAGE_SHAPE), labels))


def _chunked(items: Iterator[tuple[str, int, str, str, bytes]]) -> Iterator[list[tuple[str, int, str, str, bytes]]]:
    """Consecutive images, CHUNK_IMAGES at most and no more bytes than CHUNK_BYTES past the
    last. A refusal of the reader comes after the chunk read before it, which may hold an
    earlier error: the first error raised is the first in reading order."""
    chunk, size = [], 0
    try:
        for item in items:
            chunk.append(item)
            size += len(item[4])
            if len(chunk) == CHUNK_IMAGES or size >= CHUNK_BYTES:
                yield chunk
                chunk, size = [], 0
    except Exception:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk


def decode_files(files: list[tuple[str, bytes]]) -> np.ndarray:
    """(where, bytes) files to (n, 32, 32, 3) uint8 pixels by `decode_file`: one chunk of a
    pool's work, returned as one array (one pickle back, not n)."""
    out = np.empty((len(files), *IMAGE_SHAPE), np.uint8)
    for k, (where, data) in enumerate(files):
        out[k] = decode_file(np.frombuffer(data, np.uint8), where)
    return out


@contextlib.contextmanager
def _decoding(sources: list[Path], splits: tuple[str, ...], progress: str) -> Iterator[Callable[[int], None]]:
    """A function called with the number of images each time some are decoded. `progress`
    "rich": it advances a transient bar, as the download shows one (the total is known for
    image folders, listed once more here, which costs a directory listing, not for archives,
    which are read as they stream); "plain": a line when decoding starts and one when it
    ends, so that the wait (half a minute for CIFAR-10 on 2 cores) is not taken for a hang;
    "none": nothing."""
    if progress not in ("rich", "plain", "none"):
        raise ValueError(f"progress must be rich, plain or none, got {progress!r}")
    if progress == "plain":
        print(f"fastres: decoding the {' and '.join(splits)} images of {', '.join(map(str, sources))} "
              "(once: the decoded copy is cached)", flush=True)
        decoded, started = 0, time.perf_counter()

        def count(n: int) -> None:
            nonlocal decoded
            decoded += n
        yield count
        print(f"fastres: decoded {decoded:,} images in {time.perf_counter() - started:.0f} s", flush=True)
        return
    if progress != "rich":
        yield lambda n: None
        return
    from rich.progress import MofNCompleteColumn, Progress

    total = None if any(is_archive(s) for s in sources) else \
        sum(len(scan_tree(s, _read_from(s, splits))[0]) for s in sources)
    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), transient=True) as bar:
        task = bar.add_task(f"decoding {' and '.join(splits)} images", total=total)
        yield lambda n: bar.advance(task, n)


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
