"""Every shipped config plans for one GPU and one TPU target: its mesh, batch split, optimizer
and model switches compile there (tiny shapes: structure, not sizes)."""

import importlib.util
from pathlib import Path

import pytest

from jaxgpt.cli.plan import load_run
from jaxgpt.plan import planner
from jaxgpt.plan.targets import parse_target, target_devices


def _require(target: str) -> None:
    extra, modules = (("gpu-plan", ("jax_plugins", "jax_plugins.xla_cuda12")) if target.startswith("h")
                      else ("tpu-plan", ("libtpu",)))
    if any(importlib.util.find_spec(m) is None for m in modules):
        pytest.skip(f'planning for {target} needs pip install "jaxgpt[{extra}]"')

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
TINY = ["model.vocab_size=211", "model.context_length=128", "model.emb_dim=48",
        "model.n_heads=3", "model.n_layers=2"]


@pytest.mark.parametrize("target", ["h100", "v5e-1"])
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_plans_for_a_gpu_and_a_tpu(path, target):
    _require(target)
    run = load_run(str(path), TINY)
    t = parse_target(target)
    shape = planner.Shape(run.train.batch_size, run.optim.accum_steps, run.mesh,
                          run.model.remat_policy)
    record = planner.plan(run.model, run.optim, shape, t, decode_slots=0, devices=target_devices(t))
    train = record["train"]
    assert train["memory"]["peak"] > 0 and train["memory"]["fits"]
    fused = {"h100": "cudnn", "v5e-1": "pallas"}[target]
    if train["attention"]["kernel"] == fused:  # chosen: then it is in the program
        assert train["attention"]["evidence"]
    else:  # a fallback says why (dropout on attention weights, a float32 dtype, ...)
        assert train["attention"]["reason"]
