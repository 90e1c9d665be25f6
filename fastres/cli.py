"""Command-line plumbing shared by fastres' entry points: bad input is one line and a
non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from fastres.errors import EXIT_USAGE, EXPECTED, UsageError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2, never a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def printable_streams() -> None:
    """Let stdout and stderr print any path: a file name that is not valid UTF-8 (or not in
    the terminal's encoding) is printed with backslash escapes instead of ending the run in
    a UnicodeEncodeError, however strict the streams were set up."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a real text stream (pytest's capture is not)
            stream.reconfigure(errors="backslashreplace")


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call `main`, turning the expected errors into `fastres: error: ...` and exit 2."""
    printable_streams()
    try:
        code = main(argv)
        sys.stdout.flush()  # a reader gone away shows here, inside the handler below
        return code
    except BrokenPipeError:  # `... | head` stopped reading: nothing left to say, and no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the training loop takes it over (start-up): nothing half done
        print("fastres: interrupted", file=sys.stderr)
        return 130
    except EXPECTED as e:
        # one line, whatever a library said, in one write: stderr writes through, and print's
        # separate newline would let another process's line (a torchrun rank's) land mid-line
        sys.stderr.write(f"fastres: error: {' '.join(str(e).split())}\n")
        return EXIT_USAGE
