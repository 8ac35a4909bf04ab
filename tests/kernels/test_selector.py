"""The kernel selector follows the mesh a step is traced for, not the host: a step traced on a
CPU host for a GPU or TPU mesh gets that mesh's kernels and dtype="auto" resolution."""

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import kernels
from jaxgpt.kernels import backend_attention as BA
from jaxgpt.sharding import MeshConfig, activation_sharding, make_mesh


def _fake_mesh(platform: str):
    return SimpleNamespace(devices=np.array([SimpleNamespace(platform=platform)]), size=1)


@pytest.mark.parametrize("platform,want", [("cuda", "gpu"), ("rocm", "gpu"), ("tpu", "tpu"),
                                           ("cpu", "cpu")])
def test_backend_is_the_platform_of_the_traced_mesh(monkeypatch, platform, want):
    monkeypatch.setattr(kernels, "active_mesh", lambda: _fake_mesh(platform))
    assert kernels.backend() == want
    assert kernels.auto_compute_dtype() == (jnp.float32 if want == "cpu" else jnp.bfloat16)


def test_select_is_keyed_by_platform(monkeypatch):
    host = kernels.select("auto")
    assert host.dense is not kernels.select("reference").dense  # CPU: the layout matmul
    monkeypatch.setattr(kernels, "active_mesh", lambda: _fake_mesh("tpu"))
    tpu = kernels.select("auto")
    assert tpu is not host and tpu is kernels.kernel_set("auto", "tpu")
    assert tpu.dense is kernels.select("reference").dense  # plain dots on accelerators
    monkeypatch.setattr(kernels, "active_mesh", lambda: None)
    assert kernels.select("auto") is host  # the host's set is unchanged by the TPU trace


def test_a_cpu_mesh_context_keeps_the_cpu_kernels():
    with activation_sharding(make_mesh(MeshConfig(), jax.devices()[:1])):
        assert kernels.backend() == "cpu"
        assert kernels.select("auto") is kernels.kernel_set("auto", "cpu")
    assert kernels.backend() == jax.default_backend()


_SHARDED_PALLAS = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental.pallas import tpu as pltpu
    from jaxgpt.kernels import attention as A, backend_attention as BA
    from jaxgpt.sharding import MeshConfig, activation_sharding, make_mesh
    q, k, v = (jax.random.normal(key, (4, 128, 2, 8)) for key in jax.random.split(jax.random.key(0), 3))
    want = A.reference_attention(q, k, v)
    for shape in (MeshConfig(data=4), MeshConfig(data=2, tensor=2), MeshConfig(data=1, fsdp=2, tensor=2)):
        mesh = make_mesh(shape)
        with activation_sharding(mesh), pltpu.force_tpu_interpret_mode():
            got = jax.jit(BA.pallas_tpu_attention)(q, k, v)
        np.testing.assert_allclose(got, want, atol=2e-5)
    print("OK")
""")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the TPU kernel's interpreter runs on CPU")
def test_pallas_runs_per_shard_on_a_multi_device_mesh():
    """On a mesh of more than one device the Mosaic kernel runs under shard_map (XLA cannot
    partition it); interpreted on 4 CPU devices it equals the reference for every split."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", _SHARDED_PALLAS], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
