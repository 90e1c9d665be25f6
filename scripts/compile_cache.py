"""The compile caches (Inductor's, and Triton's where it lies apart) as one archive: packed
at the end of a GPU check so that its compiled graphs and kernels come home, and unpacked at
the start of the next one so that it starts warm instead of paying every cold compile again."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any, BinaryIO

from fastres.data.tars import open_tar
from fastres.errors import UsageError

ARCHIVE = "compile_cache.tar.gz"
LIMIT = 16 << 20  # what one file brought back from the GPU machine may weigh
ROOTS = ("inductor", "triton")


def cache_dirs() -> dict[str, Path]:
    """Where this process's compile caches are: Inductor's folder (TORCHINDUCTOR_CACHE_DIR,
    default /tmp/torchinductor_<user>), which holds Triton's kernels too unless
    TRITON_CACHE_DIR names another folder, then that one as well."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    found = {"inductor": Path(cache_dir())}
    triton = os.environ.get("TRITON_CACHE_DIR")
    if triton and not Path(triton).resolve().is_relative_to(found["inductor"].resolve()):
        found["triton"] = Path(triton)
    return found


class _TooBig(Exception):
    pass


class _Bounded:
    """A file that refuses to grow past `limit` bytes: a cache that packs too big is given
    up as soon as that is known, not after compressing all of it."""

    def __init__(self, f: BinaryIO, limit: int) -> None:
        self.f, self.limit, self.size = f, limit, 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.limit:
            raise _TooBig
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def pack(out: Path, dirs: dict[str, Path], limit: int = LIMIT) -> dict[str, Any]:
    """`dirs` into out/ARCHIVE (each under its name) if that weighs at most `limit`;
    written under a temporary name first, so a kill never leaves half an archive."""
    path, tmp = out / ARCHIVE, out / f".{ARCHIVE}.tmp"
    files = sum(len(f) for folder in dirs.values() for _, _, f in os.walk(folder))
    if not files:  # e.g. the rehearsal's compiler writes no cache: an empty archive would start nothing warm
        return {"archive": None, "files": 0, "skipped": "the compile caches are empty"}
    try:
        with open(tmp, "wb") as f, tarfile.open(fileobj=_Bounded(f, limit), mode="w:gz", compresslevel=6) as tar:
            for name, folder in dirs.items():  # gzip level 6: level 9 is slower for a few % less
                if folder.is_dir():
                    tar.add(folder, arcname=name)
    except _TooBig:
        tmp.unlink()
        return {"archive": None, "files": files, "skipped": f"packs to over {limit / 2**20:.0f} MiB"}
    tmp.replace(path)
    return {"archive": ARCHIVE, "files": files, "bytes": path.stat().st_size}


def _strip(name: str, root: str) -> str:
    return name[len(root):].lstrip("/")


def unpack(archive: Path, dirs: dict[str, Path]) -> dict[str, Any]:
    """An archive of `pack` into `dirs` (entries already there are overwritten: a cache
    entry's name is its content's hash). Members outside inductor/ and triton/, links out
    of them and absolute names are refused in one line (tarfile's "data" filter)."""
    if not archive.is_file():
        raise UsageError(f"{archive}: no such file (--compile-cache takes the {ARCHIVE} an earlier check left)")
    with open_tar(archive) as tar:
        members = tar.getmembers()
        stray = next((m.name for m in members if m.name.split("/")[0] not in ROOTS), None)
        if stray is not None:
            raise UsageError(f"{archive}: member {stray!r} is not under {' or '.join(r + '/' for r in ROOTS)}: "
                             "not a compile-cache archive of scripts/gpu_check.py")
        for root in ROOTS:
            part = [m for m in members if m.name.split("/")[0] == root and _strip(m.name, root)]
            if not part:
                continue
            if root not in dirs:
                raise UsageError(f"{archive}: holds Triton's cache apart from Inductor's; set TRITON_CACHE_DIR "
                                 "to a folder for it, as where it was packed")
            for m in part:
                m.name = _strip(m.name, root)
                if m.islnk():
                    m.linkname = _strip(m.linkname, root)
            dirs[root].mkdir(parents=True, exist_ok=True)
            try:
                tar.extractall(dirs[root], members=part, filter="data")
            except tarfile.FilterError as e:
                raise UsageError(f"{archive}: {e}") from None
    return {"unpacked": archive.name, "files": sum(m.isfile() for m in members)}
