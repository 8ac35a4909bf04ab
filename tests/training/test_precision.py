"""The precision policy: float32 parameters and optimizer state, a configurable compute dtype,
float32 softmax, logits and loss; bfloat16 training tracks float32 training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from jaxgpt import GPT, GPTConfig, init_params
from jaxgpt.training.losses import lm_loss_fn
from jaxgpt.training.optim import make_optimizer, schedule
from jaxgpt.training.runconfig import OptimConfig
from jaxgpt.training.state import init_state
from jaxgpt.training.step import train_step
from tests.conftest import TINY

OPT = OptimConfig(learning_rate=1e-2, weight_decay=0.0)


def test_auto_dtype_is_float32_on_cpu_and_bfloat16_elsewhere(monkeypatch):
    cfg = GPTConfig(**{**TINY, "dtype": "auto"})
    assert cfg.dtype == "auto" and GPTConfig().dtype == "auto"
    assert cfg.compute_dtype == (jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert cfg.compute_dtype == jnp.bfloat16
    assert GPTConfig(**{**TINY, "dtype": "float32"}).compute_dtype == jnp.float32


def _equations(jaxpr, name):
    """Every equation of primitive `name` in jaxpr and the jaxprs nested in it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            found.append(eqn)
        for sub in jaxprs_in_params(eqn.params):
            found += _equations(sub, name)
    return found


def test_bfloat16_softmax_and_loss_stay_float32():
    cfg = GPTConfig(**{**TINY, "dtype": "bfloat16"})
    params = init_params(cfg, jax.random.key(0))
    ids = jnp.arange(14).reshape(2, 7) % cfg.vocab_size
    loss = lm_loss_fn(cfg)
    for kernel_set in ("auto", "reference"):
        fn = lm_loss_fn(cfg.replace(kernels=kernel_set))
        jaxpr = jax.make_jaxpr(lambda p: fn(p, None, {"inputs": ids, "targets": ids},
                                            jax.random.key(0), True)[0])(params)
        dots = _equations(jaxpr.jaxpr, "dot_general")
        assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
        exps = _equations(jaxpr.jaxpr, "exp")
        assert exps and all(e.outvars[0].aval.dtype == jnp.float32 for e in exps)
    batch = {"inputs": ids, "targets": ids}
    assert loss(params, None, batch, jax.random.key(0), True)[0].dtype == jnp.float32
    assert GPT(cfg).apply({"params": params}, ids).dtype == jnp.float32


def _curve(dtype: str, steps: int = 30):
    cfg = GPTConfig(**{**TINY, "dtype": dtype})
    tx = make_optimizer(OPT, steps)
    state = init_state(init_params(cfg, jax.random.key(0)), tx, seed=0)
    step = jax.jit(functools.partial(train_step, loss_fn=lm_loss_fn(cfg), tx=tx,
                                     lr_fn=schedule(OPT, steps)))
    # A learnable stream: each next token is the previous one plus a row-specific stride.
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        start = rng.integers(0, 17, (8, 1))
        stride = rng.integers(1, 4, (8, 1))
        seq = (start + stride * np.arange(10)) % 17  # [B, T + 1]
        state, m = step(state, {"inputs": seq[None, :, :-1], "targets": seq[None, :, 1:]}, None)
        losses.append(float(m["loss"]))
    return np.array(losses), state


@pytest.fixture(scope="module")
def curves():
    return _curve("float32"), _curve("bfloat16")


def test_bfloat16_loss_curve_tracks_float32(curves):
    (f32, _), (bf16, _) = curves
    for losses in (f32, bf16):
        assert losses[-5:].mean() < 0.7 * losses[:5].mean()  # both learn
    np.testing.assert_allclose(bf16, f32, rtol=0.03)


def test_parameters_and_optimizer_state_stay_float32(curves):
    _, (_, state) = curves
    floats = [x for x in jax.tree.leaves((state.params, state.opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
