"""Command-line plumbing shared by fastres' entry points: bad input is one line and a
non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from fastres.errors import EXIT_USAGE, EXPECTED, UsageError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2, never a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call `main`, turning the expected errors into `fastres: error: ...` and exit 2."""
    try:
        return main(argv)
    except EXPECTED as e:
        print(f"fastres: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever a library said
        return EXIT_USAGE
