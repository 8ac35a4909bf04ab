"""What every entry point (jaxgpt.cli.*, train/*.py) shares: its process set-up, and user
errors as one line; the training scripts also turn on the persistent compilation cache.

A mistake in the input (a bad path, option, config value or data row) is printed as one
`error: ...` line on stderr with a non-zero exit; JAXGPT_DEBUG=1 re-raises it with the full
trace and keeps the libraries' logs. A library user's process is left alone: importing jaxgpt
does none of this.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings
from pathlib import Path

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
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda args: None  # a writer thread dying after the error was raised


NOISY_LOGGERS = ("absl", "orbax", "orbax.checkpoint", "asyncio")


@contextlib.contextmanager
def quiet_libraries():
    """Within: the libraries' logs and unraisable-exception reports stay off stderr, restored
    after, so a library call that fails (a damaged checkpoint Orbax cannot read) is as quiet
    as the command lines: one exception, not pages of asyncio's "Event loop is closed"."""
    if debugging():
        yield
        return
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    hook = sys.unraisablehook
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


COMPILE_CACHE_MAX_BYTES = 4 << 30


def compile_cache_dir() -> Path | None:
    """Where compiled programs are kept between runs: $JAXGPT_CACHE_DIR, else
    $XDG_CACHE_HOME/jaxgpt/xla (~/.cache/jaxgpt/xla); None when JAXGPT_COMPILE_CACHE=0."""
    if os.environ.get("JAXGPT_COMPILE_CACHE", "1").lower() in ("0", "false", "off", "no"):
        return None
    if os.environ.get("JAXGPT_CACHE_DIR"):
        return Path(os.environ["JAXGPT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxgpt" / "xla"


def enable_compile_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache in compile_cache_dir(), before any compilation:
    a rerun loads the train step and the initializer instead of compiling them. The directory
    must belong to this user (its executables are loaded and run); otherwise, or when it cannot
    be created, the cache stays off with a warning. Returns the directory, or None."""
    directory = compile_cache_dir()
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        owner = directory.stat().st_uid
    except OSError as err:
        warnings.warn(f"compilation cache off: cannot create {directory} ({err.strerror})")
        return None
    if hasattr(os, "getuid") and owner != os.getuid():
        warnings.warn(f"compilation cache off: {directory} belongs to another user")
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Cache what takes a quarter second or more to compile (JAX's default is one second, which
    # leaves out a small model's initializer and steps on a GPU).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.25)
    # Bounded: past 4 GiB the least recently used programs are deleted (JAX's default: no bound).
    jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)
    return directory
