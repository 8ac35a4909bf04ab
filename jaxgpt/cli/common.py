"""What every command line shares: user errors as one line, and no library log noise.

A mistake in the input (a bad path, option, config value or data row) is printed as one
`error: ...` line on stderr with a non-zero exit; JAXGPT_DEBUG=1 re-raises it with the full trace.
"""

from __future__ import annotations

import logging
import os
import sys

# ConfigError and CheckpointError are ValueErrors; OSError covers files and downloads.
USER_ERRORS = (ValueError, OSError, RuntimeError)


def debugging() -> bool:
    return os.environ.get("JAXGPT_DEBUG", "") not in ("", "0")


def fail(err: BaseException, code: int = 2) -> int:
    """Print `err` as one line on stderr and return `code`; under JAXGPT_DEBUG=1, re-raise it."""
    if debugging():
        raise err
    lines = str(err).strip().splitlines() or [type(err).__name__]
    print(f"error: {lines[0]}", file=sys.stderr)
    return code


def quiet_libraries() -> None:
    """Keep absl's and Orbax's info and warnings (restoring a checkpoint logs several) off the
    terminal: stdout holds the results, stderr the errors. JAXGPT_DEBUG=1 keeps them."""
    if debugging():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ info and warnings
    for name in ("absl", "orbax", "orbax.checkpoint"):
        logging.getLogger(name).setLevel(logging.ERROR)
