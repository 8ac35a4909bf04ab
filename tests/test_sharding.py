"""Sharded steps equal the single-device step, and the state is split as the rules table says.

The 8-device checks run in tests/e2e/workers/sharded_step.py: the CPU device count is fixed when
JAX starts, and this process may already have started it with one device.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jaxgpt.sharding import (
    MESH_AXES,
    activation_sharding,
    constrain,
    make_mesh,
    mesh_spec,
    process_rows,
    traced_under,
)
from jaxgpt.training.report import _bytes
from jaxgpt.training.runconfig import MeshConfig

WORKER = Path(__file__).resolve().parent / "e2e" / "workers" / "sharded_step.py"
MESHES = ["data8", "fsdp8", "tensor8", "data2_fsdp4", "data2_tensor4", "fsdp2_tensor4"]


@pytest.fixture(scope="module")
def sharded() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env["JAX_PLATFORMS"] = "cpu"  # no TPU or GPU probing where the planner's compilers are installed
    proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True,
                          timeout=480, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize("name", MESHES + ["remat", "scan_remat"])
def test_sharded_step_equals_single_device_step(sharded, name):
    ref, got = sharded["reference"], sharded[name]
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5)
    assert ref["losses"][1] != ref["losses"][0]  # the second step saw updated parameters
    assert got["param_diff"] < 1e-5
    if "mu_diff" in got:  # the first Adam moment is a running mean of the gradients
        assert got["mu_diff"] < 1e-6


# Leaf -> expected spec, written out by hand from the rules table for V=40, D=24, H=8, F=96.
# Under each mesh: embed -> fsdp, heads/mlp/vocab -> tensor, nothing -> data.
EXPECTED = {
    "data8": {"wte/embedding": [None, None], "h_0/attn/query/kernel": [None, None, None],
              "h_1/mlp/c_fc/kernel": [None, None], "lm_head": [None, None]},
    "fsdp8": {"wte/embedding": [None, "fsdp"], "h_0/attn/query/kernel": ["fsdp", None, None],
              "h_0/attn/c_proj/kernel": [None, None, "fsdp"], "h_1/mlp/c_fc/kernel": ["fsdp", None],
              "h_1/mlp/c_fc/bias": [None], "h_1/ln_2/scale": ["fsdp"], "lm_head": ["fsdp", None]},
    "tensor8": {"wte/embedding": ["tensor", None], "h_0/attn/query/kernel": [None, "tensor", None],
                "h_0/attn/c_proj/kernel": ["tensor", None, None],
                "h_1/mlp/c_fc/kernel": [None, "tensor"], "h_1/mlp/c_fc/bias": ["tensor"],
                "h_1/mlp/c_proj/kernel": ["tensor", None], "h_1/ln_2/scale": [None],
                "lm_head": [None, "tensor"]},
    "data2_fsdp4": {"wte/embedding": [None, "fsdp"], "h_0/attn/query/kernel": ["fsdp", None, None]},
    "data2_tensor4": {"wte/embedding": ["tensor", None],
                      "h_0/attn/query/kernel": [None, "tensor", None]},
    "fsdp2_tensor4": {"wte/embedding": ["tensor", "fsdp"],
                      "h_0/attn/query/kernel": ["fsdp", "tensor", None],
                      "h_1/mlp/c_fc/kernel": ["fsdp", "tensor"],
                      "h_1/mlp/c_proj/kernel": ["tensor", "fsdp"]},
    "scan_remat": {"h/attn/query/kernel": [None, "fsdp", "tensor", None],
                   "h/mlp/c_fc/kernel": [None, "fsdp", "tensor"],
                   "wte/embedding": ["tensor", "fsdp"]},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameters_are_split_as_the_rules_say(sharded, name):
    specs = sharded[name]["params"]
    for leaf, spec in EXPECTED[name].items():
        assert specs[leaf] == spec, leaf


@pytest.mark.parametrize("name", MESHES + ["scan_remat"])
def test_optimizer_state_is_split_like_the_parameters(sharded, name):
    got = sharded[name]
    assert got["mu"] == got["params"]
    assert got.get("nu", got["mu"]) == got["params"]
    if name == "fsdp8":  # ZeRO-3: every tensor with an embed axis is split, none replicated
        assert all("fsdp" in spec for leaf, spec in got["params"].items()
                   if "c_fc/bias" not in leaf)
    if name.startswith("data8"):
        assert all(set(spec) == {None} for spec in got["params"].values())


# Shardy's spelling of the activation constraints the step must carry on each mesh:
# residual stream [B, T, D], queries/keys/values [B, T, H, K], MLP hidden [B, T, F].
ACTIVATIONS = {
    "data8": ['[{"data"}, {}, {}]', '[{"data"}, {}, {}, {}]'],
    "fsdp8": ['[{"fsdp"}, {}, {}, {}]'],
    "tensor8": ['[{}, {}, {"tensor"}, {}]', '[{}, {}, {"tensor"}]'],
    "data2_fsdp4": ['[{"data", "fsdp"}, {}, {}]', '[{"data", "fsdp"}, {}, {}, {}]'],
    "data2_tensor4": ['[{"data"}, {}, {"tensor"}, {}]', '[{"data"}, {}, {"tensor"}]'],
    "fsdp2_tensor4": ['[{"fsdp"}, {}, {"tensor"}, {}]', '[{"fsdp"}, {}, {"tensor"}]'],
    "scan_remat": ['[{"fsdp"}, {}, {"tensor"}, {}]', '[{"fsdp"}, {}, {"tensor"}]'],
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_constraints_reach_the_compiled_step(sharded, name):
    for spec in ACTIVATIONS[name]:
        assert spec in sharded[name]["constraints"], spec


@pytest.mark.parametrize("name", ["fsdp8", "tensor8", "fsdp2_tensor4"])
def test_report_matches_what_each_device_holds(sharded, name):
    got = sharded[name]
    lines = got["report"].splitlines()
    for leaf, nbytes in got["bytes"].items():
        row = next(line for line in lines if line.split()[0] == leaf)
        assert row.endswith(_bytes(nbytes)), (leaf, row)
        spec = got["params"][leaf]
        assert "(" + ", ".join(map(str, spec)) + ")" in row, (leaf, row)
    assert "compiled train step, per device:" in got["report"] and "peak about" in got["report"]


def test_mesh_spec_splits_only_what_divides():
    mesh = AbstractMesh((2, 4, 3), MESH_AXES)
    assert mesh_spec(P("batch", "length", "embed"), (8, 5, 12), mesh) == P(("data", "fsdp"),
                                                                            None, None)
    assert mesh_spec(P("embed", "heads", "kv"), (12, 6, 2), mesh) == P("fsdp", "tensor", None)
    # 7 heads do not divide over tensor=3, 10 over fsdp=4: left whole, never an error.
    assert mesh_spec(P("embed", "heads", "kv"), (10, 7, 2), mesh) == P(None, None, None)
    # A size-1 axis is never named, so a spec says only what is really split.
    fsdp_only = AbstractMesh((1, 4, 1), MESH_AXES)
    assert mesh_spec(P("batch", "mlp"), (8, 9), fsdp_only) == P("fsdp", None)


def test_constrain_is_inert_outside_a_step_and_pins_inside():
    x = jnp.ones((4, 3))
    assert constrain(x, ("batch", "embed")) is x
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    with activation_sharding(mesh):
        text = jax.jit(lambda y: constrain(y, ("batch", "embed")) * 2).lower(x).as_text()
    assert "sharding_constraint" in text
    f = jax.jit(traced_under(lambda y: constrain(y, ("batch", "embed")), mesh))
    assert "sharding_constraint" in f.lower(x).as_text()  # entered at trace time, not by hand


def test_one_process_reads_every_row():
    mesh = make_mesh(MeshConfig(data=-1))
    np.testing.assert_array_equal(process_rows(mesh, 6 * jax.device_count()),
                                  np.arange(6 * jax.device_count()))


def test_mesh_places_every_device_once_in_the_asked_shape(sharded):
    """On 8 CPU devices: the asked shape (-1 filled in), each device once, and on CPU, which
    has no topology to follow, jax.devices() order."""
    grid = sharded["mesh_grid"]
    assert grid["shape"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert grid["ids"] == grid["all_ids"]
