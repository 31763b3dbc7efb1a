"""The errors an experiment reports to its user in one line (``error: ...``) instead of a traceback.

Each says what was expected, what was found and the fix. :func:`report` turns them into an exit
code for a command-line ``main``: 2 for a bad config or data (nothing was run), 1 for a run that
stopped (a full disk, a diverged loss), with the work done so far kept on disk.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class ConfigError(ValueError):
    """A config override names an unknown field or gives a bad value."""


class DataError(ValueError):
    """A data file is missing, malformed or empty."""


class StorageError(RuntimeError):
    """The work directory cannot be written (read-only, full, no permission)."""


class ConfigMismatch(ConfigError):
    """A used work directory holds a run made with another config."""


class Diverged(RuntimeError):
    """The training loss (or gradient, or parameters) turned non-finite."""


EXIT_CODES = ((ConfigError, 2), (DataError, 2), (StorageError, 1), (Diverged, 1))


@contextlib.contextmanager
def report() -> Iterator[None]:
    """Prints one of these errors as ``error: ...`` on stderr and exits with its code; other errors pass."""
    try:
        yield
    except tuple(kind for kind, _ in EXIT_CODES) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(next(code for kind, code in EXIT_CODES if isinstance(e, kind))) from None
