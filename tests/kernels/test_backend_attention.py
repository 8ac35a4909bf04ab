"""Which attention runs on each backend (a pure choice, tested here for every backend on CPU), and
each accelerator kernel against the reference: Pallas' TPU flash kernel in interpret mode on CPU,
cuDNN's on a GPU (skipped elsewhere)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.kernels import attention as A
from jaxgpt.kernels import backend_attention as BA

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


def _choose(backend, dtype=BF16, t=1024, s=None, k=64, mask=False, dropout=False):
    s = t if s is None else s
    return BA.choose_attention(backend, dtype, (2, t, 12, k), (2, s, 12, k), mask, dropout)


@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("dropout", [False, True])
def test_cpu_always_takes_its_own_kernel(dtype, dropout):
    assert _choose("cpu", dtype, mask=True, dropout=dropout) == ("cpu", None)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_dropout_takes_the_reference_and_says_why(backend):
    name, reason = _choose(backend, dropout=True)
    assert name == "reference" and "dropout" in reason


@pytest.mark.parametrize("dtype,k,t,mask,want", [
    (BF16, 64, 1024, False, "cudnn"),
    (F16, 64, 1024, True, "cudnn"),
    (BF16, 128, 7, False, "cudnn"),  # odd lengths are fine without a mask
    (F32, 64, 1024, False, "xla"),  # cuDNN flash takes half precision only
    (BF16, 12, 1024, False, "xla"),  # head width not a multiple of 8
    (BF16, 256, 1024, False, "xla"),  # wider than 128
    (BF16, 64, 7, True, "xla"),  # a mask (a bias to cuDNN) with an odd length
])
def test_gpu_choice(dtype, k, t, mask, want):
    name, reason = _choose("gpu", dtype, t=t, k=k, mask=mask)
    assert name == want
    assert (reason is None) == (want == "cudnn")


@pytest.mark.parametrize("dtype,t,s,mask,want", [
    (BF16, 1024, 1024, False, "pallas"),
    (F32, 256, 256, False, "pallas"),
    (BF16, 1024, 1024, True, "xla"),  # padding masks: not through the Pallas kernel
    (BF16, 100, 100, False, "xla"),  # not a multiple of the 128-wide block
    (BF16, 128, 256, False, "xla"),  # T != S
])
def test_tpu_choice(dtype, t, s, mask, want):
    name, reason = _choose("tpu", dtype, t=t, s=s, mask=mask)
    assert name == want
    assert (reason is None) == (want == "pallas")


def test_unknown_backend_takes_xla():
    assert _choose("metal").name == "xla"


def _qkv(key, b=2, t=7, h=3, k=8, dtype=F32):
    return tuple(jax.random.normal(kk, (b, t, h, k), dtype) for kk in jax.random.split(key, 3))


def _left_pad_mask(t):
    pad = np.ones((2, t), bool)
    pad[0, :3] = False
    return A.causal_mask(t)[None, None] & pad[:, None, None, :]


def _values_and_grads(fn, q, k, v, mask):
    r = jax.random.normal(jax.random.key(9), q.shape, F32)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, mask).astype(F32) * r)  # noqa: E731
    return fn(q, k, v, mask), jax.grad(loss, (0, 1, 2))(q, k, v)


def _assert_matches_reference(fn, q, k, v, mask, atol):
    out, grads = _values_and_grads(fn, q, k, v, mask)
    want, want_grads = _values_and_grads(A.reference_attention, q, k, v, mask)
    np.testing.assert_allclose(out, want, atol=atol)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, atol=atol)


@pytest.mark.parametrize("masked", [False, True])
def test_fallback_runs_xla_equal_to_reference_and_warns_once(masked, monkeypatch):
    """On a GPU, float32 attention falls back to XLA's composition (runnable on CPU): it equals
    the reference with and without a left-padding mask, and the fallback warns once."""
    monkeypatch.setattr(BA, "_warned", set())
    fn = BA.backend_attention("gpu")
    q, k, v = _qkv(jax.random.key(1))
    mask = _left_pad_mask(7) if masked else None
    with pytest.warns(UserWarning, match="xla path: cuDNN flash attention takes bfloat16"):
        _assert_matches_reference(lambda *a: fn(*a), q, k, v, mask, 1e-5)
    out = np.asarray(fn(q, k, v, mask))
    if masked:
        assert np.all(out[0, :3] == 0.0)  # fully masked (padding) queries give zeros
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(q, k, v, mask)  # the second fallback for the same reason is silent


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN is there to be used")
def test_a_cudnn_call_cudnn_refuses_falls_back_to_xla(monkeypatch):
    """Chosen for bfloat16 on a GPU, cuDNN's trace-time checks fail where it is missing (as on
    this CPU): XLA's composition runs instead, equal to the reference, with a warning."""
    monkeypatch.setattr(BA, "_warned", set())
    q, k, v = _qkv(jax.random.key(7), t=8, k=8, dtype=BF16)
    assert BA.choose_attention("gpu", BF16, q.shape, k.shape, False, False).name == "cudnn"
    with pytest.warns(UserWarning, match="xla path: cuDNN refused the call"):
        out = BA.backend_attention("gpu")(q, k, v)
    np.testing.assert_array_equal(out, A.fused_attention(q, k, v, implementation="xla"))


def test_dropout_on_an_accelerator_runs_the_reference_with_its_masks(monkeypatch):
    monkeypatch.setattr(BA, "_warned", set())
    q, k, v = _qkv(jax.random.key(2))
    kw = dict(dropout_rate=0.3, dropout_rng=jax.random.key(3), deterministic=False)
    with pytest.warns(UserWarning, match="reference path: attention dropout"):
        out = BA.backend_attention("tpu")(q, k, v, None, **kw)
    np.testing.assert_array_equal(out, A.reference_attention(q, k, v, None, **kw))


@pytest.fixture(scope="module")
def pallas_interpret():
    from jax.experimental.pallas import tpu as pltpu
    with pltpu.force_tpu_interpret_mode():
        yield


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the TPU kernel's interpreter is "
                    "tested on CPU (and runs natively on TPU)")
@pytest.mark.parametrize("t", [128, 256])  # one block, and a causal pair of blocks
def test_pallas_tpu_flash_equals_reference_in_interpret_mode(t, pallas_interpret):
    """The kernel the TPU runs, interpreted on CPU: values and gradients of q, k, v."""
    q, k, v = _qkv(jax.random.key(4), b=1, t=t, h=3, k=8)
    fn = BA.backend_attention("tpu")
    assert BA.choose_attention("tpu", q.dtype, q.shape, k.shape, False, False).name == "pallas"
    _assert_matches_reference(lambda q, k, v, m: fn(q, k, v, m), q, k, v, None, 2e-5)


def test_pallas_tpu_refuses_a_mask():
    q, k, v = _qkv(jax.random.key(5), t=128)
    with pytest.raises(ValueError, match="no mask"):
        BA.pallas_tpu_attention(q, k, v, _left_pad_mask(128))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
@pytest.mark.parametrize("masked", [False, True])
def test_cudnn_equals_reference_on_gpu(masked):
    q, k, v = _qkv(jax.random.key(6), t=128, h=4, k=64, dtype=BF16)
    mask = _left_pad_mask(128) if masked else None
    fn = BA.backend_attention("gpu")
    assert BA.choose_attention("gpu", BF16, q.shape, k.shape, masked, False).name == "cudnn"
    out, grads = _values_and_grads(lambda *a: fn(*a), q, k, v, mask)
    f32 = tuple(x.astype(F32) for x in (q, k, v))
    want, want_grads = _values_and_grads(A.reference_attention, *f32, mask)
    # bfloat16 inputs and outputs: a few parts in a hundred of the scale.
    for a, b in zip((out, *grads), (want, *want_grads)):
        a, b = np.asarray(a, np.float32), np.asarray(b)
        assert np.abs(a - b).max() < 0.03 * np.abs(b).max()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_model_with_cudnn_equals_reference_with_left_padding():
    """The whole model in bfloat16 on a GPU: kernels=auto (cuDNN, a padding mask as its bias)
    against kernels=reference, logits and gradients, rows with left padding included."""
    from jaxgpt.config import GPTConfig
    from jaxgpt.models.model import GPT, init_params

    cfg = GPTConfig(vocab_size=17, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                    drop_rate=0.0, dtype="bfloat16")
    assert BA.choose_attention("gpu", BF16, (2, 16, 4, 8), (2, 16, 4, 8), True, False).name == "cudnn"
    params = init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 17)
    real = jnp.ones((2, 16), bool).at[0, :5].set(False)
    r = jax.random.normal(jax.random.key(2), (2, 16, 17))

    def run(kernels):
        model = GPT(cfg.replace(kernels=kernels))
        f = lambda p: jnp.sum(model.apply({"params": p}, ids, attention_mask=real)[:, 5:] * r[:, 5:])  # noqa: E731
        return model.apply({"params": params}, ids, attention_mask=real), jax.grad(f)(params)

    (out, grads), (want, want_grads) = run("auto"), run("reference")
    out, want = np.asarray(out)[:, 5:], np.asarray(want)[:, 5:]  # padded queries' logits are unused
    assert np.abs(out - want).max() < 0.05 * np.abs(want).max()
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        assert float(jnp.abs(g - w).max()) <= 0.05 * float(jnp.abs(w).max()) + 1e-6
