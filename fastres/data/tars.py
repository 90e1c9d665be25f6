"""Tar archives opened for reading: the one place where an archive that tarfile, gzip or the
disk cannot read (truncated, corrupt, not a tar) becomes one line naming it, whichever
reader met it (the official archive, an image archive, the look at an archive's kind)."""

from __future__ import annotations

import contextlib
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from fastres.errors import DataError

UNREADABLE = (tarfile.TarError, EOFError, zlib.error, OSError)


@contextlib.contextmanager
def open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """`tarfile.open(path)` to read; a failure to read it, at the open or at any member the
    block reads, is a DataError naming the archive."""
    try:
        with tarfile.open(path, "r:*") as tar:
            yield tar
    except UNREADABLE as e:
        raise DataError(f"{path}: unreadable archive ({e}); it is truncated or corrupt") from None
