"""The lock of a run directory: an exclusive `flock` on RUN_DIR/.lock held by its one writer.

Re-entrant within a process (a trainer that holds it may call what takes it again); a second
process gets one line naming the holder. The kernel drops the lock when its process ends however
it ends, so the lock of a killed run is never stale.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from jaxgpt.training.runconfig import ConfigError

LOCK_NAME = ".lock"
_held: dict[Path, list] = {}  # resolved run dir -> [file object, times acquired by this process]


class RunDirInUse(ConfigError):
    """Another live process is training in this run directory."""


def acquire(run_dir: Path) -> None:
    """Take (or re-enter) this process's lock on `run_dir`; refuse if another process has it."""
    key = run_dir.resolve()
    if key in _held:
        _held[key][1] += 1
        return
    f = open(key / LOCK_NAME, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunDirInUse(f"run directory {run_dir} is in use by {holder}; wait for it to finish "
                          "or choose another name or runs_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held[key] = [f, 1]


def release(run_dir: Path) -> None:
    """Undo one `acquire`; the lock goes when the last one is undone (or the process ends)."""
    key = run_dir.resolve()
    if key not in _held:
        return
    _held[key][1] -= 1
    if _held[key][1] == 0:
        f, _ = _held.pop(key)
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
