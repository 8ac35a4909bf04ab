"""Orbax checkpoints of the train state that resume exactly.

A checkpoint holds the full train state (params, optimizer state, step, RNG) plus a JSON record
of the run (its configuration and the data position, which is just the step because batches are
a pure function of seed and step). Saves are asynchronous. A step directory counts only when
Orbax has committed it (`commit_success.txt`); anything else (a crash mid-write, a copy gone
wrong) is moved aside on start, never loaded and never deleted. Reading a run's model without
resuming it is `jaxgpt.weights.loader.load_model`, which changes nothing on disk.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxgpt.config import RUNTIME_FIELDS, GPTConfig
from jaxgpt.training.runlock import acquire, release
from jaxgpt.weights.runs import (
    CheckpointError,
    CorruptCheckpoint,
    checksums,
    complete_steps,
    first_line,
    unreadable,
    verify,
)


def set_aside_incomplete(directory: str | Path) -> list[Path]:
    """Rename uncommitted step directories so Orbax never sees them; returns the new paths.

    Only under the run directory's lock (the run directory is `directory`'s parent): a step that
    a live trainer is still writing looks uncommitted, so with another process holding the lock
    this refuses in one line (RunDirInUse) and moves nothing. A trainer holding it re-enters."""
    d = Path(directory)
    if not d.is_dir() or jax.process_index() != 0:
        return []
    acquire(d.parent)
    try:
        good = set(complete_steps(d))
        moved = []
        for child in d.iterdir():
            if child.is_dir() and child.name.isdigit() and int(child.name) not in good:
                target = d.parent / f"incomplete-{child.name}-{int(time.time())}"
                child.rename(target)
                moved.append(target)
        return moved
    finally:
        release(d.parent)


class Checkpointer:
    """Keep-last-N asynchronous Orbax checkpoints of (state, meta) in `directory`."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.moved_aside = set_aside_incomplete(self.directory)  # process 0 renames
        if jax.process_count() > 1:
            # Every process waits for those renames before Orbax (or latest_step) lists the
            # directory, so none of them can pick up a step that is being moved aside.
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxgpt-checkpoint-set-aside:{self.directory}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        steps = complete_steps(self.directory)
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Save asynchronously, with a checksum of every array in the meta record; a state with
        a non-finite value is refused, never written."""
        sums, not_finite = checksums(state)
        if not_finite:
            raise CheckpointError(f"refusing to write checkpoint {step}: array {not_finite[0]} of "
                                  "the train state holds NaN or inf")
        self._check(lambda: self.manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**meta, "checksums": sums}))),
            f"writing checkpoint {step}")

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        """Restore onto `target` (abstract arrays carrying shardings) and check every array
        against the checksums written with it; CorruptCheckpoint names the first that differs."""
        where = f"checkpoint step {step} in {self.directory}"
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as err:  # Orbax/TensorStore on a truncated or damaged file
            raise unreadable(where, err) from err
        verify(out["state"], out["meta"].get("checksums"), where)
        return out["state"], out["meta"]

    def restore_latest(self, target: Any) -> tuple[Any, dict, int] | None:
        """(state, meta, step) of the newest complete step that reads back intact, or None when
        there is no step. A damaged newer step is named on stderr and moved aside (never
        deleted); the run then redoes its steps, which gives the same result."""
        bad = []
        for step in reversed(complete_steps(self.directory)):
            try:
                state, meta = self.restore(step, target)
            except CorruptCheckpoint as err:
                bad.append(step)
                print(f"warning: {err}; trying the step before", file=sys.stderr, flush=True)
                continue
            if bad:
                self._set_aside(bad, "corrupt")
            return state, meta, step
        if bad:
            raise CheckpointError(f"no checkpoint in {self.directory} reads back intact (steps "
                                  f"{sorted(bad)}); move the directory aside to start afresh")
        return None

    def _set_aside(self, steps: list[int], why: str) -> None:
        if jax.process_index() == 0:
            for step in steps:
                (self.directory / str(step)).rename(
                    self.directory.parent / f"{why}-{step}-{int(time.time())}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxgpt-checkpoint-{why}:{self.directory}")
        self.manager.reload()

    def _check(self, action, what: str):
        """Run an Orbax call; its failures (a full disk, a lost directory, an earlier
        asynchronous write that failed) become one CheckpointError line."""
        try:
            return action()
        except CheckpointError:
            raise
        except Exception as err:
            text = str(err)
            # TensorStore's message leads with the array and a long path; the cause comes last.
            reason = ("No space left on device" if "No space left on device" in text
                      or "os_error_code='28'" in text else first_line(err))
            raise CheckpointError(f"{what} in {self.directory} failed: {reason}") from err

    def read_meta(self, step: int) -> dict:
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def wait(self) -> None:
        self._check(self.manager.wait_until_finished, "a checkpoint write")

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that tell Orbax where each restored array goes (any topology)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def model_config_diff(saved: dict, current: GPTConfig) -> list[str]:
    """Fields where a run directory's model differs from `current`, as 'field: a != b'."""
    now = current.to_dict()
    return [f"{k}: {saved.get(k)!r} != {now[k]!r}" for k in now if saved.get(k) != now[k]
            and k not in RUNTIME_FIELDS]
