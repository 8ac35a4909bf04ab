"""The matmul under every Dense of the model, spelled in the layouts XLA:CPU runs fast.

XLA:CPU hands a dot to its fast library (YNNPACK, which uses AMX/AVX-512 bf16 where the CPU
has them) only when both operands are row-major [M, C] x [C, N] or [M, C] x [N, C] and, for
bfloat16 operands, the result is float32. Anything else -- the [C, M] x [M, N] contraction of a
weight gradient, a bfloat16 result, an operand that went through a bfloat16 2-D transpose --
falls back to a generic matmul, and bfloat16 operands are first converted to float32. Measured
on a 2-core Xeon with AMX: a 2048^3 bfloat16 dot with a float32 result ran at ~1200 GFLOP/s,
the same dot with a bfloat16 result at ~240, float32 at ~270.

`matmul` is a custom-VJP matmul whose forward and both backward products take those layouts;
the kernel selector (jaxgpt/kernels/__init__.py) routes every Dense (dense.py) and the LM head
through it on CPU. Elsewhere (GPU, TPU) the compiler's own choices are kept. The arithmetic is
the same either way.

Mixed precision: the weight may stay float32 while x is bfloat16. It is then cast to x's dtype
inside the matmul, and its gradient comes back as the float32 product it was accumulated in.
Casting outside (flax's default) makes the gradient bfloat16 first and float32 again after,
which costs two passes over every weight gradient and rounds it to 8 bits of mantissa.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ROWS = (((1,), (0,)), ((), ()))  # [M, C] x [C, N]
ROWS_T = (((1,), (1,)), ((), ()))  # [M, C] x [N, C]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(x, w, rhs_t: bool, out_dtype):
    """x [M, C] @ w ([C, N], or [N, C] if rhs_t) -> [M, N] in out_dtype, float32 accumulation.

    w is used in x's dtype; its gradient keeps w's own dtype (see the module's docstring)."""
    dims = ROWS_T if rhs_t else ROWS
    return jax.lax.dot_general(x, w.astype(x.dtype), dims,
                               preferred_element_type=jnp.float32).astype(out_dtype)


def _matmul_fwd(x, w, rhs_t, out_dtype):
    return matmul(x, w, rhs_t, out_dtype), (x, w)


def transposed(a):
    """[R, C] -> [C, R] as a copy; through a unit axis so a bf16 copy stays bf16 on XLA:CPU."""
    return jnp.transpose(a[:, :, None], (1, 0, 2))[:, :, 0]


def _matmul_bwd(rhs_t, out_dtype, res, g):
    x, w = res
    g = g.astype(x.dtype)  # [M, N]; a float32 logits gradient is rounded like an activation's
    wc = w.astype(x.dtype)
    f32 = jnp.float32
    if rhs_t:  # w [N, C]
        dx = jax.lax.dot_general(g, wc, ROWS, preferred_element_type=f32)  # [M, C]
        dw = jax.lax.dot_general(transposed(g), x, ROWS, preferred_element_type=f32)  # [N, C]
    else:  # w [C, N]
        dx = jax.lax.dot_general(g, wc, ROWS_T, preferred_element_type=f32)  # [M, C]
        dw = jax.lax.dot_general(transposed(x), g, ROWS, preferred_element_type=f32)  # [C, N]
    return dx.astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def matmul_bias(x, w, b, out_dtype):
    """x [M, C] @ w [C, N] + b [N] -> [M, N] in out_dtype; the bias is added to the float32
    product before the cast, and its gradient is a [1, M] x [M, N] product with ones: the
    column sum that autodiff would emit runs on XLA:CPU as a slow reduce-window loop."""
    return (matmul(x, w, False, jnp.float32) + b.astype(jnp.float32)).astype(out_dtype)


def _matmul_bias_fwd(x, w, b, out_dtype):
    return matmul_bias(x, w, b, out_dtype), (x, w, b)


def _matmul_bias_bwd(out_dtype, res, g):
    x, w, b = res
    dx, dw = _matmul_bwd(False, out_dtype, (x, w), g)
    ones = jnp.ones((1, g.shape[0]), x.dtype)
    db = jax.lax.dot_general(ones, g.astype(x.dtype), ROWS, preferred_element_type=jnp.float32)
    return dx, dw, db[0].astype(b.dtype)


matmul_bias.defvjp(_matmul_bias_fwd, _matmul_bias_bwd)
