"""The train state: what a checkpoint holds and a step carries, and its shardings."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxgpt.config import GPTConfig
from jaxgpt.models.model import abstract_params, init_params
from jaxgpt.sharding import boxed_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # batches consumed (the data position)
    params: Any  # trained parameters
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays
    skips: jax.Array  # consecutive non-finite updates skipped


def init_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        skips=jnp.zeros((), jnp.int32),
    )


def abstract_state(boxed_params, tx, seed: int = 0):
    """The state's shapes with logical boxes kept on params and Adam moments."""
    return jax.eval_shape(lambda p: init_state(p, tx, seed), boxed_params)



def state_shardings(boxed_params, tx, mesh):
    """NamedShardings for every leaf of the train state, from the logical axis rules."""
    return boxed_shardings(abstract_state(boxed_params, tx), mesh)


def create_state(config: GPTConfig, tx, mesh, seed: int, params=None):
    """A sharded train state: fresh parameters from `seed`, or the given ones placed."""
    boxed = abstract_params(config)
    shardings = state_shardings(boxed, tx, mesh)
    if params is None:
        init = lambda key: init_params(config, key)  # noqa: E731
        params = jax.jit(init, out_shardings=shardings.params)(jax.random.key(seed))
    else:
        params = jax.device_put(params, shardings.params)
    make = jax.jit(lambda p: init_state(p, tx, seed), out_shardings=shardings)
    return make(params), shardings


