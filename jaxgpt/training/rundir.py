"""A run directory has one writer: the process that holds its lock.

`prepare_run_dir` creates the directory, refuses one that holds a different model, and takes an
exclusive `flock` on RUN_DIR/.lock (process 0 of a multi-process run; the others write nothing
but their checkpoint shards). A second trainer on the same directory gets one line naming the
process that has it. The kernel drops the lock when its process ends however it ends, so the
lock of a killed run is never stale. Readers (`load_model`, `load_classifier`, the CLIs) take no
lock: they never write to a run directory.
"""

from __future__ import annotations

from pathlib import Path

import jax

from jaxgpt.training.checkpoint import model_config_diff
from jaxgpt.training.runconfig import (
    ConfigError,
    RunConfig,
    config_from_yaml,
    save_config,
)
from jaxgpt.training.runlock import LOCK_NAME, RunDirInUse, acquire, release  # noqa: F401

def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create and lock the run directory, refusing one that belongs to a different model.

    Each call is matched by a `release(cfg.run_dir)` when the caller is done writing."""
    run_dir = cfg.run_dir
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        acquire(run_dir)
    saved = run_dir / "config.yaml"
    if saved.exists():
        diff = model_config_diff(config_from_yaml(saved, type(cfg)).model.to_dict(), cfg.model)
        if diff:
            release(run_dir)
            raise ConfigError(
                f"run directory {run_dir} holds a different model ({'; '.join(diff)}); "
                "choose another name or runs_dir"
            )
    if jax.process_index() == 0:
        save_config(cfg, saved)
    return run_dir
