"""Known bad input, reported as one block: `error: <message>` on stderr and exit code 2.

Every check that refuses a run before it starts (config keys, data files, model and output
directories, backend combinations) raises a `ProtegeError` whose message names the key, file
or line and the fix; `report` prints it without a traceback. `PROTEGE_DEBUG=1` re-raises
instead, with the traceback. Import-free, so any module may raise these.
"""

from __future__ import annotations

import os
import sys

EXIT_CODE = 2  # what argparse exits with on a usage error
DEBUG_VARIABLE = "PROTEGE_DEBUG"


class ProtegeError(ValueError):
    """A bad input the user can fix; the message says which and how."""


class SetupError(ProtegeError):
    """A run that cannot start as configured: a model or output path, a backend combination."""


def report(error: BaseException) -> int:
    """Print `error: <message>` to stderr and return the exit code; with PROTEGE_DEBUG=1,
    re-raise `error` with its traceback instead."""
    if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
        raise error
    cause = getattr(error, "cause", None)  # a Ray task error carries the worker's exception
    message = str(cause if isinstance(cause, ProtegeError) else error)
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_CODE


class AlgorithmConfigError(ProtegeError):
    """A bad algorithm hyper-parameter; `key` is the dotted path under `algorithm`. Here, not
    in the registry, so the config loader checks it without importing torch."""

    def __init__(self, key: str, message: str):
        super().__init__(f"algorithm.{key}: {message}" if key else f"algorithm: {message}")
        self.key = key
