"""The official CIFAR-10 python archive: download, verify, read its pickled batches."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from fastres.data.dataset import NUM_CLASSES, Split, Splits
from fastres.errors import DataError

ARCHIVE_NAME = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
# The published md5 of each file of the extracted folder (as torchvision's dataset code lists them).
BATCH_MD5 = {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
             "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
             "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e"}
CHUNK = 1 << 20


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_md5(path: Path, md5: str) -> None:
    got = md5_of(path)
    if got != md5:
        raise DataError(f"{path}: md5 {got} does not match the expected {md5}: the file is corrupt or "
                        "not the official archive; delete it and download it again")


def download(url: str, dest: Path, md5: str | None = ARCHIVE_MD5) -> Path:
    """Fetch `url` to `dest` with a progress bar, verify it, and only then move it into place."""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(),
                          transient=True) as bar:
                task = bar.add_task(f"downloading {dest.name}", total=total)
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    f.write(chunk)
                    bar.advance(task, len(chunk))
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise DataError(f"could not download CIFAR-10 from {url} ({reason}); put {ARCHIVE_NAME} in "
                        f"{dest.parent} or pass --data PATH to a copy of the data") from None
    if md5 is not None:
        try:
            verify_md5(part, md5)
        except DataError:
            part.unlink(missing_ok=True)
            raise
    os.replace(part, dest)
    return dest


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle only what the CIFAR batches hold (dicts, lists, bytes, numpy arrays), so a
    malicious archive cannot run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's own signature
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_batch(raw: bytes, name: str) -> Split:
    batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{name}: expected uint8 rows of 3072 pixels, got {data.dtype} {data.shape}")
    if len(labels) != len(data) or labels.min(initial=0) < 0 or labels.max(initial=0) >= NUM_CLASSES:
        raise DataError(f"{name}: labels do not match the images or fall outside 0-9")
    # Rows are 1024 red, 1024 green, 1024 blue values: to HWC like every other source.
    return Split(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels)


def read_archive(path: Path, md5: str | None = None) -> Splits:
    """Read the official python-format archive (or a small one built the same way)."""
    if md5 is not None:
        verify_md5(path, md5)
    wanted = {f"{BATCH_DIR}/{b}" for b in (*TRAIN_BATCHES, TEST_BATCH)}
    raw: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    raw[member.name.rsplit("/", 1)[1]] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path}: unreadable archive ({e}); it is truncated or corrupt") from None
    missing = [b for b in (*TRAIN_BATCHES, TEST_BATCH) if b not in raw]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)} under {BATCH_DIR}/; not a complete "
                        "CIFAR-10 python archive")
    return _splits(raw, path)


def _splits(raw: dict[str, bytes], where: Path) -> Splits:
    """The training and test splits from the raw batch files, read with the restricted unpickler."""
    try:
        train = Split.concat([_read_batch(raw[b], b) for b in TRAIN_BATCHES])
        test = _read_batch(raw[TEST_BATCH], TEST_BATCH)
    except (pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError) as e:
        raise DataError(f"{where}: a batch could not be read ({e!r}); it is corrupt") from None
    return Splits(train, test)


def folder_files(folder: Path) -> list[Path]:
    """The batch files of an extracted `cifar-10-batches-py/` folder."""
    return [folder / name for name in (*TRAIN_BATCHES, TEST_BATCH)]


def read_folder(folder: Path) -> Splits:
    """The extracted folder torchvision leaves (`cifar-10-batches-py/`), each file held to
    its published md5 and read with the same restricted unpickler as the archive."""
    raw = {}
    for path in folder_files(folder):
        if not path.is_file():
            raise DataError(f"{path}: missing from the extracted CIFAR-10 folder")
        got = md5_of(path)
        if got != BATCH_MD5[path.name]:
            raise DataError(f"{path}: md5 {got} is not the published {BATCH_MD5[path.name]}: the file is altered "
                            "or corrupt; extract it again")
        raw[path.name] = path.read_bytes()
    return _splits(raw, folder)
