"""Command-line plumbing shared by fastres' entry points: bad input is one line and a
non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from fastres.data.dataset import DataError

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad argument or option; the message is one line for the user."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2, never a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


class RunError(Exception):
    """A run cannot start or continue (e.g. unwritable run directory, no checkpoint)."""


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call `main`, turning the expected errors into `fastres: error: ...` and exit 2."""
    try:
        return main(argv)
    except (UsageError, DataError, RunError) as e:
        print(f"fastres: error: {e}", file=sys.stderr)
        return EXIT_USAGE
