"""The errors a user can cause: each carries a one-line message, and the entry points turn
it into `fastres: error: ...` and exit status 2. This module imports nothing of fastres."""

from __future__ import annotations

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad argument or option."""


class DataError(Exception):
    """Bad or missing data."""


class RunError(Exception):
    """A run cannot start or continue (e.g. unwritable run directory, no checkpoint)."""


EXPECTED = (UsageError, DataError, RunError)
