"""What an entry point (train/*.py, jaxgpt.cli.*) sets up for its own process, in one call.

- glibc keeps freed memory (jaxgpt/hostmem.py), before the first JAX computation;
- Orbax's background threads stay quiet when they fail. A failed asynchronous checkpoint write
  (a full disk, a lost directory) reaches the training loop as an exception, which the entry
  point prints as one line; meanwhile the writer threads log the same failure with a traceback
  (absl) and asyncio prints "Event loop is closed" for every callback still pending, hundreds of
  lines burying that one. JAXGPT_DEBUG=1 keeps all of it.

A library user's process is left alone: importing jaxgpt does none of this.
"""

from __future__ import annotations

import logging
import os
import sys

from jaxgpt.hostmem import retain_freed_memory


def debug() -> bool:
    """JAXGPT_DEBUG=1: show full tracebacks and library logs."""
    return os.environ.get("JAXGPT_DEBUG", "0") not in ("", "0")


def setup_process() -> None:
    """Call first thing in an entry point's main, before any JAX computation."""
    retain_freed_memory()
    if debug():
        return
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None
