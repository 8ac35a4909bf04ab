"""The TPU's per-row cache write (an elementwise select, kept in the cache's tiled layout) writes
what the scatter writes, for a stacked and a single-layer cache, dropping slots past the end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import kernels
from jaxgpt.models import cache as C


@pytest.mark.parametrize("lead", [(), (1,)])
def test_tpu_select_write_equals_the_scatter(monkeypatch, lead):
    k1, k2 = jax.random.split(jax.random.key(0))
    shape = ((3,) if lead else ()) + (5, 2, 7, 4)  # [L?, B, H, S, K]
    buf = jax.random.normal(k1, shape).astype(jnp.bfloat16)
    new = jax.random.normal(k2, (5, 1, 2, 4))  # [B, T=1, H, K]
    index = jnp.array([0, 6, 3, 7, 2])  # 7 is past the last slot: dropped
    want = C.write_cache(buf, new, lead, index)  # the host's (CPU) scatter
    monkeypatch.setattr(kernels, "backend", lambda: "tpu")
    got = C.write_cache(buf, new, lead, index)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
