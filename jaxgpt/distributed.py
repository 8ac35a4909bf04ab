"""Multi-process runs: start JAX's distributed runtime before anything touches a device.

One process runs per host (or per GPU); together they drive one global mesh. A run is
multi-process when the config says so (`distributed.num_processes > 1`), when environment
variables do (JAX_NUM_PROCESSES > 1 with JAX_PROCESS_ID, and JAX_COORDINATOR_ADDRESS, the one
JAX itself reads), or when a cluster launcher that JAX detects by itself started several tasks
(SLURM, Open MPI, TPU on GKE); `distributed.enabled=true` joins unconditionally and lets JAX
find the ranks (a Cloud TPU pod). Otherwise nothing is initialised and the run is the ordinary
single-process one. Every process runs the same program; only process 0 writes logs
and artifacts, while every process takes part in each step and each checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import jax
import numpy as np

from jaxgpt.checks import NON_NEGATIVE_INT, POSITIVE_INT, check_fields, optional


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process runs (see jaxgpt.distributed); unset fields fall back to JAX_* env vars."""

    # None: multi-process only when the fields, JAX_* variables or a launcher say so; True:
    # always join (JAX finds a TPU pod's or a cluster's ranks itself); False: never.
    enabled: Optional[bool] = None
    coordinator_address: Optional[str] = None  # host:port of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    initialization_timeout: int = 300  # seconds to wait for every process to join

    def __post_init__(self):
        check_fields(self, {"num_processes": optional(POSITIVE_INT),
                            "process_id": optional(NON_NEGATIVE_INT),
                            "initialization_timeout": POSITIVE_INT})


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _launcher_tasks() -> int:
    """Tasks a cluster launcher that JAX auto-detects says it started (1 when none)."""
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if (n := _int_env(name)) is not None:
            return n
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return max(len([h for h in hosts.split(",") if h]), 1)


def plan(cfg: DistributedConfig) -> dict | None:
    """The jax.distributed.initialize arguments for this process, or None for one process."""
    if cfg.enabled is False:
        return None
    address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    count = cfg.num_processes if cfg.num_processes is not None else _int_env("JAX_NUM_PROCESSES")
    index = cfg.process_id if cfg.process_id is not None else _int_env("JAX_PROCESS_ID")
    if count is not None and count < 1:
        raise ValueError(f"distributed.num_processes must be at least 1, got {count}")
    if count is not None and index is not None and not 0 <= index < count:
        raise ValueError(f"distributed.process_id={index} is outside [0, {count})")
    if count is not None and count > 1:
        if address is None:
            raise ValueError(
                f"distributed.num_processes={count} needs distributed.coordinator_address "
                "(host:port of process 0) or JAX_COORDINATOR_ADDRESS"
            )
        if index is None:
            raise ValueError(
                f"distributed.num_processes={count} needs distributed.process_id or JAX_PROCESS_ID"
            )
        return dict(coordinator_address=address, num_processes=count, process_id=index,
                    initialization_timeout=cfg.initialization_timeout)
    if cfg.enabled or (count is None and _launcher_tasks() > 1):
        # SLURM / Open MPI / TPU pod: JAX reads the coordinator and ranks from the launcher.
        args = dict(coordinator_address=address, num_processes=count, process_id=index,
                    initialization_timeout=cfg.initialization_timeout)
        return {k: v for k, v in args.items() if v is not None}
    return None


def maybe_initialize(cfg) -> bool:
    """Call jax.distributed.initialize when this run is multi-process; True if it is now."""
    dist = getattr(cfg, "distributed", cfg)
    if jax.distributed.is_initialized():
        return True
    args = plan(dist)
    if args is None:
        return False
    jax.distributed.initialize(**args)
    return True


def is_lead() -> bool:
    """True on the process that writes logs, plots and config files (process 0)."""
    return jax.process_index() == 0


def host_copy(tree):
    """A numpy copy of a tree of (possibly multi-process sharded) arrays, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    # Every process must call this together: the gather is a collective.
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
