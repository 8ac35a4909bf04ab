"""The run's real steps compiled for a target's devices, on shapes alone (nothing allocated).

`compile_train` builds what the Trainer builds (the config's mesh over the target's devices,
AdamW from `optim`, the LM loss, the train state's shardings from the logical axes) and lowers
`training.step.compile_steps`' train step for a batch [A, B / A, T]; `compile_decode` lowers the
serving engine's decode step (`inference.engine.decode_step`) for `slots` rows over a cache of
`max_len` slots on one chip, as the engine runs it. Both are traced inside the mesh's
`activation_sharding`, so the kernel selector sees the target's platform, not the host's.
"""

from __future__ import annotations

import dataclasses
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxgpt.config import GPTConfig
from jaxgpt.inference.engine import decode_step
from jaxgpt.inference.sampling import Sampling
from jaxgpt.models.cache import init_cache
from jaxgpt.models.model import abstract_params
from jaxgpt.sharding import MeshConfig, activation_sharding, batch_sharding, boxed_shardings, make_mesh
from jaxgpt.training.checkpoint import abstract_with_shardings
from jaxgpt.training.losses import lm_loss_fn
from jaxgpt.training.optim import make_optimizer, schedule
from jaxgpt.training.runconfig import OptimConfig
from jaxgpt.training.state import abstract_state
from jaxgpt.training.step import compile_steps

ACCELERATORS = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Compiled:
    program: object  # jax.stages.Compiled
    seconds: float  # lowering and compiling
    mesh: Mesh
    param_bytes: int = 0  # one device's share of the parameters
    opt_bytes: int = 0  # of the optimizer state


def for_platform(config: GPTConfig, platform: str) -> GPTConfig:
    """`config` with dtype="auto" resolved for `platform` (bfloat16 on accelerators), so what
    is built outside the trace (a KV cache) agrees with what the trace resolves."""
    if config.dtype != "auto":
        return config
    return config.replace(dtype="bfloat16" if platform in ACCELERATORS else "float32")


def _timed(lower) -> tuple[object, float]:
    start = time.perf_counter()
    program = lower().compile()
    return program, time.perf_counter() - start


def compile_train(config: GPTConfig, optim: OptimConfig, mesh_cfg: MeshConfig, devices, *,
                  batch_size: int, accum_steps: int, steps: int = 1000) -> Compiled:
    """The LM train step of a run compiled for `devices` (the Trainer's mesh, optimizer, state
    shardings and step), for a global batch of `batch_size` rows in `accum_steps` micro-batches."""
    mesh = make_mesh(mesh_cfg, devices)
    tx = make_optimizer(dataclasses.replace(optim, accum_steps=1), steps)
    abstract = abstract_state(abstract_params(config), tx)
    state_sh = boxed_shardings(abstract, mesh)
    state = abstract_with_shardings(nn.meta.unbox(abstract), state_sh)
    train, _ = compile_steps(lm_loss_fn(config), tx, schedule(optim, steps), state_sh, mesh)
    shape = (accum_steps, batch_size // accum_steps, config.context_length)  # [A, B, T]
    ids = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, 3))
    program, seconds = _timed(lambda: train.lower(state, {"inputs": ids, "targets": ids}, None))
    return Compiled(program, seconds, mesh, device_bytes(state.params),
                    device_bytes(state.opt_state))


def device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its largest share)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def decode_arguments(config: GPTConfig, device, slots: int, max_len: int):
    """Shapes of the engine's decode-step arguments (params, cache, tokens, positions, sampling,
    draws), placed on `device`."""
    sh = jax.sharding.SingleDeviceSharding(device)
    place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)  # noqa: E731
    params = jax.tree.map(place, abstract_params(config, boxed=False))
    cache = jax.tree.map(place, jax.eval_shape(lambda: init_cache(config, slots, max_len)))
    row = lambda dtype: jax.ShapeDtypeStruct((slots,), dtype, sharding=sh)  # noqa: E731
    # Per-row options, as the engine holds them: every slot may sample with its own.
    sampling = Sampling(row(jnp.float32), row(jnp.int32), row(jnp.float32))
    draws = (row(jnp.uint32), row(jnp.int32))  # seed, count
    return params, cache, row(jnp.int32), row(jnp.int32), sampling, draws


def compile_decode(config: GPTConfig, device, *, slots: int, max_len: int) -> Compiled:
    """The serving engine's decode step (one token for each of `slots` rows over a cache of
    `max_len` positions) compiled for one chip, as the engine runs it."""
    mesh = Mesh(np.asarray([device]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    args = decode_arguments(config, device, slots, max_len)
    # A fresh jit of a fresh function: JAX caches a trace by the function, argument shapes and
    # config, so a trace made for another platform's mesh would be reused.
    def fresh(params, cache, tokens, positions, sampling, draws, *, config):
        return decode_step.__wrapped__(params, cache, tokens, positions, sampling, draws,
                                       config=config)

    step = jax.jit(fresh, static_argnames=("config",), donate_argnames=("cache",))
    with activation_sharding(mesh):
        program, seconds = _timed(lambda: step.lower(*args, config=config))
    return Compiled(program, seconds, mesh)

