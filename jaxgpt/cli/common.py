"""What every entry point (jaxgpt.cli.*, train/*.py) shares: its process set-up, and user
errors as one line.

A mistake in the input (a bad path, option, config value or data row) is printed as one
`error: ...` line on stderr with a non-zero exit; JAXGPT_DEBUG=1 re-raises it with the full
trace and keeps the libraries' logs. A library user's process is left alone: importing jaxgpt
does none of this.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from jaxgpt.hostmem import retain_freed_memory

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


def setup_process() -> None:
    """Call first thing, before any JAX computation: glibc keeps freed memory
    (jaxgpt/hostmem.py), and the libraries stay quiet unless JAXGPT_DEBUG=1.

    Quiet means: absl's and Orbax's info and warnings (restoring a checkpoint logs several) stay
    off the terminal, so stdout holds the results and stderr the errors; and when an
    asynchronous checkpoint write fails (a full disk), Orbax's writer threads log the failure
    with tracebacks, asyncio logs "Task exception was never retrieved" and prints "Event loop is
    closed" for every callback still pending: hundreds of lines burying the one the training
    loop raises and `fail` prints."""
    retain_freed_memory()
    if debugging():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ info and warnings
    for name in ("absl", "orbax", "orbax.checkpoint", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda args: None  # a writer thread dying after the error was raised
