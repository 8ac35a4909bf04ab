"""Dense projections: the reference (flax's arithmetic) and the CPU layout path.

`dense(x, kernel, bias, n_in, dtype)` contracts x's trailing `n_in` axes with the kernel's
leading ones: x [..., in...] x kernel [in..., out...] (+ bias [out...]) -> [..., out...] in
`dtype`. The reference casts x, kernel and bias to `dtype` first, as flax's Dense does. The
layout path (CPU) flattens to [M, C] x [C, N] and runs `matmul.matmul_bias`, which casts the
float32 kernel inside the product so its gradient stays the float32 product (matmul.py says
why that matters on XLA:CPU). The arithmetic of the forward pass is the same either way.

`project(x, w, rhs_t, out_dtype)` is the LM head's product, float32 logits from x's dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxgpt.kernels.matmul import matmul, matmul_bias


def _dims(x, n_in: int):
    return ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))


def reference_dense(x, kernel, bias, n_in: int, dtype):
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    y = jax.lax.dot_general(x, kernel, _dims(x, n_in))  # [..., out...]
    return y if bias is None else y + bias.astype(dtype)


def layout_dense(x, kernel, bias, n_in: int, dtype):
    x = x.astype(dtype)
    lead, outs = x.shape[: x.ndim - n_in], kernel.shape[n_in:]
    x2 = x.reshape(-1, math.prod(x.shape[x.ndim - n_in:]))  # [M, C]
    w2 = kernel.reshape(-1, math.prod(outs))  # [C, N]
    y = matmul(x2, w2, False, dtype) if bias is None else matmul_bias(x2, w2, bias.reshape(-1), dtype)
    return y.reshape(lead + outs)


def reference_project(x, w, rhs_t: bool, out_dtype):
    dims = (((x.ndim - 1,), (1 if rhs_t else 0,)), ((), ()))
    return jax.lax.dot_general(x, w.astype(x.dtype), dims,
                               preferred_element_type=jnp.float32).astype(out_dtype)


def layout_project(x, w, rhs_t: bool, out_dtype):
    return matmul(x.reshape(-1, x.shape[-1]), w, rhs_t, out_dtype).reshape(*x.shape[:-1], -1)
