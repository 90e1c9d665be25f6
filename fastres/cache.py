"""See or clear fastres' cache: `python -m fastres.cache [--clear]`.

Lists what fastres wrote in its cache folder, each file with its size, and the total: the
decoded data (`decoded/*.npz`, one entry per data source, replaced when its files change),
downloaded official archives, and leftovers of interrupted downloads (`.part`) and writes
(`.tmp`). `--clear` removes the decoded data and the leftovers and keeps the archives (a
download is 163 MB); a file fastres did not name is never touched.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fastres.cli import Parser, run_main
from fastres.data.dataset import DATASETS
from fastres.data.sources import CACHE_WAY_OUT, ENTRY, LEGACY_ENTRY, TEMPORARY, default_cache_dir, file_in_place
from fastres.errors import RunError

ARCHIVE = "downloaded archive; --clear keeps it"


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def owned(folder: Path) -> list[tuple[Path, str]]:
    """The files fastres wrote in a cache folder, each with what it is."""
    decoded = folder / "decoded"
    found = []
    for path in sorted(decoded.iterdir()) if decoded.is_dir() else []:
        if ENTRY.fullmatch(path.name) or LEGACY_ENTRY.fullmatch(path.name):
            found.append((path, "decoded data"))
        elif TEMPORARY.fullmatch(path.name):
            found.append((path, "interrupted write"))
    for cifar in DATASETS.values():
        found.append((folder / f"{cifar.archive}.part", "interrupted download"))
        found.append((folder / cifar.archive, ARCHIVE))
    return [(path, what) for path, what in found if _regular(path)]


def _line(size: int, name: str, what: str = "") -> str:
    return f"{size:>15,} bytes  {name}" + (f"  ({what})" if what else "")


def listing(folder: Path) -> str:
    files = owned(folder)
    sizes = [path.stat().st_size for path, _ in files]
    lines = [f"fastres cache: {folder}"]
    lines += [_line(size, str(path.relative_to(folder)), what) for (path, what), size in zip(files, sizes, strict=True)]
    lines.append(_line(sum(sizes), f"in all, {len(files)} file{'' if len(files) == 1 else 's'}"))
    return "\n".join(lines)


def clear(folder: Path) -> str:
    """Remove the decoded data and leftovers; say what went and how many bytes."""
    lines, total = [f"fastres cache: {folder}"], 0
    for path, what in owned(folder):
        if what == ARCHIVE:
            continue
        size = path.stat().st_size
        try:
            path.unlink()
        except OSError as e:
            raise RunError(f"cannot remove {path} ({e.strerror or e})") from None
        lines.append(_line(size, f"removed {path.relative_to(folder)}", what))
        total += size
    lines.append(f"removed {len(lines) - 1} file{'' if len(lines) == 2 else 's'}, {total:,} bytes")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m fastres.cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--clear", action="store_true",
                   help="remove the decoded data and leftovers fastres wrote (downloaded archives are kept)")
    args = p.parse_args(argv)
    folder = default_cache_dir()
    blocking = file_in_place(folder)
    if blocking is not None:  # else the listing would show an empty cache that cannot exist
        raise RunError(f"the cache folder {folder} cannot be made ({blocking} is a file, not a folder): "
                       f"{CACHE_WAY_OUT}")
    try:
        print(clear(folder) if args.clear else listing(folder))
    except OSError as e:  # a cache folder that cannot be listed or read (permissions)
        raise RunError(f"cannot read the cache {folder} ({e.strerror or e})") from None
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
