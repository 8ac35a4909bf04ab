"""GPT-2's GELU (the tanh approximation, chapter 4) with float32 arithmetic inside.

    gelu(x) = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))

On bfloat16 activations, `jax.nn.gelu` rounds every intermediate to bfloat16, saves three of
them for the backward pass (three extra tensors of the MLP's width written per layer) and
autodiff's backward is a chain of about ten bfloat16 multiplies, each rounded again. Here
the forward is one pass that computes in float32 and rounds once, the backward keeps only
the input and recomputes tanh in float32 alongside the derivative: one pass each way, and the
result is closer to the exact function than the bfloat16 chain. On float32 inputs it is
jax.nn.gelu(approximate=True), bit for bit in the forward pass.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_C = math.sqrt(2.0 / math.pi)
_A = 0.044715


def _inner(x):
    return _C * (x + _A * x**3)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """The tanh-approximated GELU, computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    return (xf * (0.5 * (1.0 + jnp.tanh(_inner(xf))))).astype(x.dtype)


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    xf = x.astype(jnp.float32)
    t = jnp.tanh(_inner(xf))
    slope = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _C * (1.0 + 3.0 * _A * xf * xf)
    return ((g.astype(jnp.float32) * slope).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def reference_gelu(x: jax.Array) -> jax.Array:
    """The definition `gelu` is tested against: jax.nn.gelu's tanh form in x's dtype."""
    return jax.nn.gelu(x, approximate=True)
