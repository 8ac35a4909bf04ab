"""When a run joins a multi-process group, and what it asks jax.distributed for."""

import jax
import numpy as np
import pytest

from jaxgpt.distributed import host_copy, maybe_initialize, plan
from jaxgpt.training.runconfig import DistributedConfig, RunConfig, load_config

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)


def test_single_process_by_default():
    assert plan(DistributedConfig()) is None
    assert maybe_initialize(RunConfig()) is False and jax.process_count() == 1


def test_config_fields_name_the_group():
    cfg = DistributedConfig(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2)
    assert plan(cfg) == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2,
                             initialization_timeout=300)
    assert plan(DistributedConfig(num_processes=1)) is None


def test_environment_variables_name_the_group(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host:99")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert plan(DistributedConfig())["process_id"] == 1
    # The config wins over the environment.
    assert plan(DistributedConfig(process_id=0))["process_id"] == 0


@pytest.mark.parametrize("name, value", [("SLURM_NTASKS", "4"), ("OMPI_COMM_WORLD_SIZE", "2"),
                                         ("TPU_WORKER_HOSTNAMES", "t0,t1")])
def test_cluster_launchers_are_left_to_jax(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    args = plan(DistributedConfig())
    assert args is not None and "num_processes" not in args  # JAX detects the ranks itself
    monkeypatch.setenv(name, "1" if name != "TPU_WORKER_HOSTNAMES" else "t0")
    assert plan(DistributedConfig()) is None


@pytest.mark.parametrize("cfg, message", [
    (DistributedConfig(num_processes=2, process_id=0), "coordinator_address"),
    (DistributedConfig(num_processes=2, coordinator_address="h:1"), "process_id"),
    (DistributedConfig(num_processes=2, process_id=2, coordinator_address="h:1"),
     r"process_id=2 is outside \[0, 2\)"),
])
def test_incomplete_groups_are_named(cfg, message):
    with pytest.raises(ValueError, match=message):
        plan(cfg)


def test_impossible_counts_are_refused_when_built(monkeypatch):
    with pytest.raises(ValueError, match="num_processes must be a positive integer or null, got 0"):
        DistributedConfig(num_processes=0)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "0")  # the environment's value is checked by plan
    with pytest.raises(ValueError, match="num_processes must be at least 1"):
        plan(DistributedConfig())


def test_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        plan(DistributedConfig())


def test_run_config_reads_distributed_fields():
    cfg = load_config(None, ["distributed.num_processes=2", "distributed.process_id=1",
                             "distributed.coordinator_address=h:5"])
    assert cfg.distributed == DistributedConfig(coordinator_address="h:5", num_processes=2,
                                                process_id=1)


def test_host_copy_is_numpy():
    out = host_copy({"a": jax.numpy.arange(3)})
    assert isinstance(out["a"], np.ndarray) and out["a"].tolist() == [0, 1, 2]


def test_enabled_forces_or_forbids_joining(monkeypatch):
    assert plan(DistributedConfig(enabled=True)) == dict(initialization_timeout=300)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert plan(DistributedConfig(enabled=False)) is None
