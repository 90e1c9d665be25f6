"""The official CIFAR-10 and CIFAR-100 python archives and the folders they extract to:
download, verify, read their pickled batches."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from fastres.data.dataset import CIFAR10, DATASETS, Cifar, Split, Splits
from fastres.data.tars import open_tar
from fastres.errors import DataError

CHUNK = 1 << 20
# One batch file at most: the largest official one, CIFAR-100's `train`, is 50,000 rows of 3,072
# pixels (153.6 MB) plus labels and file names; an archive member declaring more is refused by
# its header, before it is read.
MAX_BATCH_BYTES = 256 << 20


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


def download(url: str, dest: Path, md5: str | None) -> Path:
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
        raise DataError(f"could not download {url} ({reason}); put {dest.name} in "
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


def _read_batch(raw: bytes, name: str, cifar: Cifar) -> Split:
    batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[cifar.label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{name}: expected uint8 rows of 3072 pixels, got {data.dtype} {data.shape}")
    if len(labels) != len(data) or labels.min(initial=0) < 0 or labels.max(initial=0) >= cifar.num_classes:
        raise DataError(f"{name}: labels do not match the images or fall outside 0-{cifar.num_classes - 1}")
    # Rows are 1024 red, 1024 green, 1024 blue values: to HWC like every other source.
    return Split(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels)


def read_archive(path: Path, md5: str | None = None, cifar: Cifar = CIFAR10) -> Splits:
    """Read the official python-format archive (or a small one built the same way)."""
    if md5 is not None:
        verify_md5(path, md5)
    wanted = {f"{cifar.folder}/{b}" for b in (*cifar.train_files, cifar.test_file)}
    raw: dict[str, bytes] = {}
    with open_tar(path) as tar:
        for member in tar:
            if member.name in wanted and member.isfile():
                if member.size > MAX_BATCH_BYTES:
                    raise DataError(f"{path}: member {member.name!r} is {member.size:,} bytes, over the "
                                    f"{MAX_BATCH_BYTES:,} any official batch file needs")
                raw[member.name.rsplit("/", 1)[1]] = tar.extractfile(member).read()
    missing = [b for b in (*cifar.train_files, cifar.test_file) if b not in raw]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)} under {cifar.folder}/; not a complete "
                        f"{cifar.name} python archive")
    return _splits(raw, path, cifar)


def _splits(raw: dict[str, bytes], where: Path, cifar: Cifar) -> Splits:
    """The training and test splits from the raw batch files, read with the restricted unpickler."""
    try:
        train = Split.concat([_read_batch(raw[b], b, cifar) for b in cifar.train_files])
        test = _read_batch(raw[cifar.test_file], cifar.test_file, cifar)
    except (pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError) as e:
        raise DataError(f"{where}: a batch could not be read ({e!r}); it is corrupt") from None
    return Splits(train, test)


def folder_files(folder: Path, cifar: Cifar = CIFAR10) -> list[Path]:
    """The batch files of an extracted folder (`cifar-10-batches-py/`, `cifar-100-python/`)."""
    return [folder / name for name in (*cifar.train_files, cifar.test_file)]


def dataset_of_folder(name: str) -> Cifar | None:
    """The data set whose archive extracts to a folder of this name."""
    return next((d for d in DATASETS.values() if d.folder == name), None)


def read_folder(folder: Path, cifar: Cifar = CIFAR10) -> Splits:
    """The extracted folder torchvision leaves (`cifar-10-batches-py/`), each file held to
    its published md5 and read with the same restricted unpickler as the archive."""
    raw = {}
    for path in folder_files(folder, cifar):
        if not path.is_file():
            raise DataError(f"{path}: missing from the extracted {cifar.name} folder")
        got = md5_of(path)
        if got != cifar.file_md5[path.name]:
            raise DataError(f"{path}: md5 {got} is not the published {cifar.file_md5[path.name]}: the file is "
                            "altered or corrupt; extract it again")
        raw[path.name] = path.read_bytes()
    return _splits(raw, folder, cifar)
