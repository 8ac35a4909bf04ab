"""The chunked LM head + cross-entropy equals the head's product followed by optax's loss, in
value and in gradient with respect to the hidden states and the head (tied and untied), with
ignored targets, a last partial chunk and a padded vocabulary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.data.windows import IGNORE
from jaxgpt.kernels.chunked_loss import chunked_head_cross_entropy_sum
from jaxgpt.kernels.cross_entropy import reference_cross_entropy_sum
from jaxgpt.kernels.dense import reference_project

B, T, D, V = 2, 7, 12, 17


def _inputs(padded_v, head_t):
    kh, kw, kt = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(kh, (B, T, D))
    head = jax.random.normal(kw, (padded_v, D) if head_t else (D, padded_v)) * 0.5
    targets = jax.random.randint(kt, (B, T), 0, V).at[0, :3].set(IGNORE).at[1, 5].set(IGNORE)
    return hidden, head, targets


def _reference(hidden, head, targets, head_t):
    logits = reference_project(hidden, head, head_t, jnp.float32)[..., :V]  # real columns only
    return reference_cross_entropy_sum(logits, targets, IGNORE)


@pytest.mark.parametrize("head_t", [False, True])
@pytest.mark.parametrize("padded_v,chunk", [(V, 4), (V, 14), (V, 64), (24, 5)])  # 64 > N = 14
def test_chunked_equals_reference_values_and_gradients(head_t, padded_v, chunk):
    hidden, head, targets = _inputs(padded_v, head_t)

    def chunked(h, w):
        return chunked_head_cross_entropy_sum(h, w, head_t, targets, IGNORE, chunk=chunk,
                                              vocab_size=V, dtype=jnp.float32)

    reference = lambda h, w: _reference(h, w, targets, head_t)  # noqa: E731
    got, got_g = jax.value_and_grad(chunked, (0, 1))(hidden, head)
    want, want_g = jax.value_and_grad(reference, (0, 1))(hidden, head)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(g, w, atol=1e-5)
    # Ignored targets' hidden states get no gradient, nor do padded vocabulary rows.
    assert np.all(np.asarray(got_g[0])[0, :3] == 0.0)
    pad_rows = np.asarray(got_g[1])[V:] if head_t else np.asarray(got_g[1])[:, V:]
    assert np.all(pad_rows == 0.0)


def test_chunked_under_jit_in_bfloat16_tracks_float32():
    hidden, head, targets = _inputs(V, False)
    f = lambda dt: jax.jit(jax.value_and_grad(lambda h, w: chunked_head_cross_entropy_sum(  # noqa: E731
        h, w, False, targets, IGNORE, chunk=4, vocab_size=V, dtype=dt), (0, 1)))(hidden, head)
    (lo, lo_g), (hi, hi_g) = f(jnp.bfloat16), f(jnp.float32)
    assert abs(float(lo) - float(hi)) < 0.02 * abs(float(hi))
    for a, b in zip(lo_g, hi_g):
        assert float(jnp.abs(a - b).max()) < 0.05 * float(jnp.abs(b).max())
