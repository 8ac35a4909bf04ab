import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt import GPT, GPTConfig, init_params
from jaxgpt.data.windows import IGNORE
from jaxgpt.training.losses import cross_entropy_sum, lm_loss_fn
from jaxgpt.training.optim import make_optimizer, schedule
from jaxgpt.training.runconfig import OptimConfig
from jaxgpt.training.state import init_state
from jaxgpt.training.step import train_step
from tests.conftest import TINY

CFG = GPTConfig(**TINY)
OPT = OptimConfig(learning_rate=1e-2, weight_decay=0.1, warmup_steps=0)


def _step(accum_batch):
    tx = make_optimizer(OPT, 10)
    state = init_state(init_params(CFG, jax.random.key(0)), tx, seed=0)
    fn = jax.jit(functools.partial(train_step, loss_fn=lm_loss_fn(CFG), tx=tx,
                                   lr_fn=schedule(OPT, 10)))
    return fn(state, accum_batch, None)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 17, (6, 9))
    y = rng.integers(0, 17, (6, 9))
    # Ignore a ragged set of targets so micro-batches count different numbers of tokens.
    y[0, 5:] = IGNORE
    y[3, :8] = IGNORE
    y[4, 2] = IGNORE
    return x, y


def test_cross_entropy_ignores_masked_targets():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    targets = jnp.array([[1, IGNORE, 4], [IGNORE, IGNORE, 0]])
    manual = -sum(jax.nn.log_softmax(logits[b, t])[targets[b, t]]
                  for b, t in [(0, 0), (0, 2), (1, 2)])
    np.testing.assert_allclose(cross_entropy_sum(logits, targets), manual, rtol=1e-6)


def test_cross_entropy_gradient_equals_autodiff_of_log_softmax():
    """The hand-written gradient against autodiff of an optax loss: softmax minus one-hot on
    counted rows, zero on ignored ones, scaled by the incoming cotangent; bfloat16 logits get
    a bfloat16 gradient."""
    logits = 4.0 * jax.random.normal(jax.random.key(1), (3, 4, 37))
    targets = jnp.array([[1, IGNORE, 36, 0], [IGNORE] * 4, [5, 5, IGNORE, 2]])

    def reference(x):
        safe = jnp.where(targets == IGNORE, 0, targets)
        losses = optax.softmax_cross_entropy_with_integer_labels(x, safe)
        return jnp.sum(jnp.where(targets == IGNORE, 0.0, losses))

    np.testing.assert_allclose(cross_entropy_sum(logits, targets), reference(logits), rtol=1e-6)
    got = jax.grad(lambda x: 2.5 * cross_entropy_sum(x, targets))(logits)
    want = jax.grad(lambda x: 2.5 * reference(x))(logits)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.all(np.asarray(got)[1] == 0.0) and np.all(np.asarray(got)[0, 1] == 0.0)
    low = jax.grad(lambda x: cross_entropy_sum(x, targets))(logits.astype(jnp.bfloat16))
    assert low.dtype == jnp.bfloat16


@pytest.mark.parametrize("accum", [2, 3, 6])
def test_accumulation_equals_one_large_batch(batch, accum):
    x, y = batch
    full_state, full_m = _step({"inputs": x[None], "targets": y[None]})
    micro = {"inputs": x.reshape(accum, -1, 9), "targets": y.reshape(accum, -1, 9)}
    acc_state, acc_m = _step(micro)
    np.testing.assert_allclose(acc_m["loss"], full_m["loss"], rtol=1e-6)
    np.testing.assert_allclose(acc_m["grad_norm"], full_m["grad_norm"], rtol=1e-5)
    assert int(acc_m["tokens"]) == int((y != IGNORE).sum())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 acc_state.params, full_state.params)


def test_loss_is_mean_over_counted_tokens(batch):
    x, y = batch
    _, m = _step({"inputs": x[None], "targets": y[None]})
    logits = GPT(CFG).apply({"params": init_params(CFG, jax.random.key(0))}, jnp.asarray(x))
    mask = y != IGNORE
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, np.where(mask, y, 0))
    np.testing.assert_allclose(m["loss"], ce[mask].mean(), rtol=1e-6)


def test_non_finite_update_is_skipped(batch):
    x, y = batch
    tx = make_optimizer(OPT, 10)
    params = init_params(CFG, jax.random.key(0))
    params["wte"]["embedding"] = params["wte"]["embedding"].at[3].set(jnp.nan)
    state = init_state(params, tx, seed=0)
    x = x.copy()
    x[0, 0] = 3  # this token's NaN embedding poisons the loss
    step = jax.jit(functools.partial(train_step, loss_fn=lm_loss_fn(CFG), tx=tx,
                                     lr_fn=schedule(OPT, 10)))
    new, m = step(state, {"inputs": x[None], "targets": y[None]}, None)
    assert int(m["skipped"]) == 1 and int(new.skips) == 1 and int(new.step) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.params, state.params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.opt_state, state.opt_state)
    assert not np.array_equal(new.rng, state.rng)  # the RNG still moves on
