"""The pure train and eval steps, compiled once with explicit shardings.

A batch is a dict of arrays shaped [A, B, T]: A micro-batches (gradient accumulation) of B rows.
`targets` uses IGNORE (-100) for positions that do not count. The loss of a step is the sum of
token losses over every micro-batch divided by the number of counted target tokens in the whole
step, so k micro-batches give exactly the gradient of one large batch. A loss summed over other
units (preference pairs) says so with `units(batch)`, the count its sum is a mean over.

Loss functions: see jaxgpt.training.losses.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxgpt.sharding import batch_sharding, traced_under
from jaxgpt.training.losses import token_counts
from jaxgpt.training.state import TrainState


def train_step(
    state: TrainState,
    batch: dict,
    frozen: Any = None,
    *,
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    lr_fn: Callable,
    grad_shardings: Any = None,
    units: Callable | None = None,
):
    """One optimizer step over all micro-batches of `batch`; skips non-finite updates.

    The summed loss is divided by `units(batch)` (default: the counted target tokens)."""
    key = jax.random.wrap_key_data(state.rng)
    key, step_key = jax.random.split(key)
    total = jnp.maximum(_units(batch, units), 1).astype(jnp.float32)

    def scaled_loss(params, frozen, mb, rng, deterministic):
        # Differentiating loss / total saves a pass that divides every gradient afterwards.
        loss_sum, aux = loss_fn(params, frozen, mb, rng, deterministic)
        return loss_sum / total, (loss_sum, aux)

    grad_fn = jax.value_and_grad(scaled_loss, has_aux=True)

    def micro(carry, xs):
        loss_acc, grad_acc = carry
        index, mb = xs
        (_, (loss_sum, _)), grads = grad_fn(
            state.params, frozen, mb, jax.random.fold_in(step_key, index), False
        )
        if grad_shardings is not None:  # split like the params (FSDP: reduce-scatter, not all-reduce)
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        if grad_acc is not None:
            grads = jax.tree.map(jnp.add, grad_acc, grads)
        return (loss_acc + loss_sum, grads), None

    n_micro = batch["targets"].shape[0]
    if n_micro == 1:
        # No accumulation: no zero-filled gradient tree to add into (a whole-tree pass each).
        (loss_sum, grads), _ = micro(
            (jnp.zeros((), jnp.float32), None), (jnp.int32(0), jax.tree.map(lambda b: b[0], batch))
        )
    else:
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (loss_sum, grads), _ = jax.lax.scan(
            micro, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(n_micro), batch)
        )
    loss = loss_sum / total
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(operands):
        params, opt_state, grads = operands
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # A non-finite loss or gradient leaves parameters and optimizer state untouched. A cond,
    # not a select of new against old: the select keeps the old moments alive next to the new
    # ones, so XLA copies them, and re-reads every leaf once more.
    new_params, new_opt = jax.lax.cond(
        finite, update, lambda ops: (ops[0], ops[1]), (state.params, state.opt_state, grads)
    )
    new_state = TrainState(
        step=state.step + 1,
        params=new_params,
        opt_state=new_opt,
        rng=jax.random.key_data(key),
        skips=jnp.where(finite, 0, state.skips + 1),
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": lr_fn(state.step),
        "tokens": token_counts(batch["targets"]),
        "skipped": (~finite).astype(jnp.int32),
    }
    return new_state, metrics


def _units(batch: dict, units: Callable | None) -> jax.Array:
    return token_counts(batch["targets"]) if units is None else units(batch)


def eval_step(params, batch: dict, frozen: Any = None, *, loss_fn: Callable,
              units: Callable | None = None) -> dict:
    """Summed loss and its units (counted tokens by default) of one [B, T] batch (no dropout)."""
    loss_sum, aux = loss_fn(params, frozen, batch, jax.random.key(0), True)
    return {"loss_sum": loss_sum, "count": _units(batch, units), "aux": aux}


def compile_steps(loss_fn, tx, lr_fn, state_sh, mesh, frozen_sh=None, units=None):
    """jit the train and eval steps with explicit shardings; the state buffer is donated.

    Both are traced under `activation_sharding(mesh)`, so activations follow the rules table.
    """
    batch_sh = batch_sharding(mesh, 3)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = functools.partial(train_step, loss_fn=loss_fn, tx=tx, lr_fn=lr_fn,
                             grad_shardings=state_sh.params, units=units)
    train = jax.jit(
        traced_under(step, mesh),
        in_shardings=(state_sh, batch_sh, frozen_sh),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        traced_under(functools.partial(eval_step, loss_fn=loss_fn, units=units), mesh),
        in_shardings=(state_sh.params, batch_sharding(mesh, 2, 0), frozen_sh),
        out_shardings=replicated,  # every process can read the metrics (multi-host)
    )
    return train, evaluate
