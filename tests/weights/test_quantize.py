"""Inference weights in bfloat16 and int8 (jaxgpt.weights.quantize): every family's logits stay
close to float32's, a briefly trained model keeps its perplexity and greedy tokens, the
quantized tree places on an 8-device mesh and gives the same logits, and its bytes shrink."""

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt.config import GPTConfig
from jaxgpt.inference.generate import generate
from jaxgpt.kernels.quantized import is_quantized
from jaxgpt.models.model import GPT, abstract_params, init_params
from jaxgpt.trees import flatten
from jaxgpt.weights.huggingface import save_pretrained
from jaxgpt.weights.loader import load_model
from jaxgpt.weights.quantize import quantize, quantized_axes, targets, weight_bytes
from tests.conftest import TINY

WORKER = Path(__file__).resolve().parents[1] / "e2e" / "workers" / "quantized_sharded.py"
FAMILIES = {
    "gpt2": dict(qkv_bias=True),
    "llama": dict(family="llama", n_kv_heads=1, mlp_dim=20),
    "qwen3": dict(family="qwen3", n_kv_heads=1, head_width=6, mlp_dim=20, tie_embeddings=True),
}
IDS = jnp.array([[1, 5, 2, 16, 9, 3, 7], [4, 4, 0, 11, 13, 8, 6]])


@pytest.fixture(scope="module", params=[(f, s) for f in FAMILIES for s in (False, True)],
                ids=lambda p: f"{p[0]}-{'scan' if p[1] else 'unrolled'}")
def family(request):
    name, scan = request.param
    cfg = GPTConfig(**{**TINY, **FAMILIES[name], "scan_layers": scan})
    params = init_params(cfg, jax.random.key(1))
    apply = jax.jit(lambda p: GPT(cfg).apply({"params": p}, IDS))
    return cfg, params, apply


def test_int8_quantizes_the_block_kernels_only(family):
    cfg, params, _ = family
    q = quantize(params, "int8")
    flat = flatten(q, is_leaf=is_quantized)
    kernels = {p for p, x in flat.items() if is_quantized(x)}
    assert kernels == set(targets(params))
    per_block = 6 if cfg.family == "gpt2" else 7  # q, k, v, o + c_fc, c_proj | gate, up, down
    assert len(kernels) == per_block * (1 if cfg.scan_layers else cfg.n_layers)
    for path, x in flat.items():
        if path not in kernels:  # embeddings, head, norms and biases stay float32
            assert x.dtype == jnp.float32, path
    assert all(("attn" in p or "mlp" in p) and p.endswith("/kernel") for p in kernels)


def test_logits_stay_close_to_float(family):
    cfg, params, apply = family
    ref = np.asarray(apply(params))
    scale = np.abs(ref).max()
    for weights, group, tol in [("int8", None, 1e-2), ("int8", 2, 5e-3), ("bfloat16", None, 2e-2)]:
        got = np.asarray(apply(quantize(params, weights, group)))
        assert got.dtype == np.float32
        err = np.abs(got - ref).max()
        assert 0 < err <= tol * scale, (weights, group, err, scale)


def test_init_and_abstract_trees_stay_float(family):
    cfg, params, _ = family
    shapes = abstract_params(cfg, boxed=False)
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    assert not any(is_quantized(x) for x in jax.tree.leaves(params, is_leaf=is_quantized))
    # the abstract quantized tree: what quantize makes, boxed with the kernels' logical names
    boxed = quantized_axes(abstract_params(cfg), "int8", 2)
    made = jax.eval_shape(lambda p: quantize(p, "int8", 2), params)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), nn.meta.unbox(boxed)) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), made)


def test_a_quantized_kernel_of_the_wrong_shape_is_refused(family):
    cfg, params, apply = family
    q = quantize(params, "int8")
    path = next(iter(targets(params)))
    flat = flatten(q, is_leaf=is_quantized)
    k = flat[path]
    flat[path] = {"q": k["q"][..., :1], "scale": k["scale"][..., :1]}
    from jaxgpt.trees import unflatten

    with pytest.raises(Exception, match="shape"):
        apply(unflatten(flat))


# ---- a model trained briefly on the-verdict (character level) -----------------------------------

TRAIN_CFG = dict(context_length=64, emb_dim=48, n_heads=4, n_layers=2, drop_rate=0.0,
                 dtype="float32")


@pytest.fixture(scope="module")
def trained():
    """(config, params, held-out windows [N, 65], last loss): 400 Adam steps on the first 90%
    of the-verdict, one id per character (~15 s on two CPU cores)."""
    data_dir = os.environ.get("JAXGPT_DATA_DIR")  # as conftest's data_dir, once per module
    if not data_dir or not os.path.isdir(data_dir):
        pytest.skip("JAXGPT_DATA_DIR is not set to the shared data directory")
    text = Path(data_dir, "the-verdict.txt").read_text(encoding="utf-8")
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], np.int32)
    cut = int(0.9 * len(ids))
    train, held = ids[:cut], ids[cut:]
    cfg = GPTConfig(vocab_size=len(chars), **TRAIN_CFG)
    T = cfg.context_length
    params = init_params(cfg, jax.random.key(0))
    opt = optax.adam(3e-3)

    def loss_fn(p, x, y):
        logits = GPT(cfg).apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state, rng = opt.init(params), np.random.default_rng(0)
    for _ in range(400):
        starts = rng.integers(0, len(train) - T - 1, 16)
        x = np.stack([train[s:s + T] for s in starts])
        y = np.stack([train[s + 1:s + T + 1] for s in starts])
        params, state, loss = step(params, state, x, y)
    n = (len(held) - 1) // T
    windows = np.stack([held[i * T:i * T + T + 1] for i in range(n)])  # [N, T + 1]
    return cfg, params, windows, float(loss)


def _score(cfg, params, windows):
    """(mean held-out cross-entropy, argmax ids [N, T])."""
    logits = jax.jit(lambda p, x: GPT(cfg).apply({"params": p}, x))(params, windows[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()
    return float(nll), np.asarray(jnp.argmax(logits, -1))


def test_trained_model_keeps_perplexity_and_greedy_tokens(trained):
    """Measured (62 characters, D=48, 2 layers, 400 steps; 31 held-out windows of 64, ~2 k
    characters): held-out perplexity float32 8.398; int8 per channel 8.401 (+0.03%), per group
    of 12 8.399 (+0.003%), bfloat16 8.397 (-0.02%). The argmax agrees at 99.5% (int8 per
    channel), 99.7% (groups of 12), 99.6% (bfloat16) of held-out positions; greedy decoding of
    48 new tokens from 8 prompts gives the same token at 93.8%, 95.8%, 93.8% of positions (a
    decode that diverges once stays different, so this is the stricter count). Floors: 1%
    perplexity, 99% argmax, 90% greedy tokens."""
    cfg, params, windows, train_loss = trained
    ref_nll, ref_top = _score(cfg, params, windows)
    assert np.exp(ref_nll) < 12  # it learned something (uniform over ~60 characters: 60)
    prompts = windows[:8, :16]
    ref_gen = generate(params, cfg, prompts, 48)[:, 16:]
    for weights, group in [("int8", None), ("int8", 12), ("bfloat16", None)]:
        q = quantize(params, weights, group)
        nll, top = _score(cfg, q, windows)
        ratio = np.exp(nll) / np.exp(ref_nll)
        assert abs(ratio - 1) < 0.01, (weights, group, ratio)
        assert (top == ref_top).mean() > 0.99, (weights, group, (top == ref_top).mean())
        same = (generate(q, cfg, prompts, 48)[:, 16:] == ref_gen).mean()
        assert same > 0.9, (weights, group, same)


def test_engine_decodes_int8_weights_as_generate_does(trained):
    """The serving and harness path (the continuous-batching engine) on int8 weights gives
    `generate`'s greedy tokens on the same weights."""
    from jaxgpt.inference.engine import Engine, Request, run_to_end

    cfg, params, windows, _ = trained
    q = quantize(params, "int8")
    prompts = windows[:3, :10]
    want = generate(q, cfg, prompts, 12)[:, 10:]
    engine = Engine(q, cfg, slots=2, max_queue=4).start()
    got = [[] for _ in prompts]
    try:
        run_to_end(engine, [Request(list(map(int, p)), 12, lambda t, f, out=out: out.append(t) or True)
                            for p, out in zip(prompts, got)])
    finally:
        engine.stop()
    np.testing.assert_array_equal(np.array(got), want)


# ---- memory ------------------------------------------------------------------------------------


def test_int8_bytes():
    """int8 q plus float32 scales: 0.25x float32 of the quantized kernels plus the scales (here
    <0.26x); the whole model's ratio depends on the share of embeddings and head, which stay
    float32: GPT-2 small (124M, tied) 0.489x, untied 0.610x; by the same count Llama 3.2 1B
    (tied) 0.410x, Llama 3 8B 0.348x. bfloat16: 0.5x."""
    cfg = GPTConfig(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12,
                    tie_embeddings=True)
    shapes = abstract_params(cfg, boxed=False)
    q = jax.eval_shape(lambda p: quantize(p, "int8"), shapes)
    kernels = set(targets(shapes))
    part = lambda tree: {p: x for p, x in flatten(tree).items()  # noqa: E731
                         if p in kernels or p.rsplit("/", 1)[0] in kernels}
    ratio_part = weight_bytes(part(q)) / weight_bytes(part(shapes))
    ratio_all = weight_bytes(q) / weight_bytes(shapes)
    assert ratio_part <= 0.3 and 0.25 < ratio_part < 0.26
    assert 0.45 < ratio_all < 0.5  # 85M of GPT-2's 124M are the blocks' kernels; wte is 38.6M
    bf16 = jax.eval_shape(lambda p: quantize(p, "bfloat16"), shapes)
    assert weight_bytes(bf16) * 2 == weight_bytes(shapes)
    g = jax.eval_shape(lambda p: quantize(p, "int8", 64), shapes)
    assert weight_bytes(part(g)) / weight_bytes(part(shapes)) < 0.27  # + 1/64 of scales


# ---- placement on an 8-device mesh --------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    # XLA reads the device count when jax starts, so the 8-device run needs a process of its own.
    out = tmp_path_factory.mktemp("quantized_sharded") / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], capture_output=True, text=True,
                          timeout=480, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mesh", ["fsdp8", "tensor8", "fsdp2_tensor4"])
def test_quantized_tree_on_a_mesh_gives_the_same_logits(sharded, mesh):
    got = sharded[mesh]
    assert got["devices"] == 8
    assert got["placed_diff"] < 1e-5 and got["requantized_diff"] < 1e-5  # vs one device, int8
    assert got["loaded_diff"] < 1e-5  # load_model(mesh=..., weights="int8"), streamed
    assert got["same_place"] and got["loaded_same_place"]  # = host-quantized, placed by the rules
    assert got["q_bytes_per_device"] < got["q_bytes"]  # the int8 weights are split, not copied


def test_scales_shard_with_their_kernels(sharded):
    specs = sharded["fsdp2_tensor4"]["specs"]
    # c_fc [D, F]: q split like the kernel; its per-channel scale [1, F] along F only
    assert specs["h_0/mlp/c_fc/kernel/q"] == ["fsdp", "tensor"]
    assert specs["h_0/mlp/c_fc/kernel/scale"] == [None, "tensor"]
    # query [D, H, K]: per group of 6 rows of D, scale [D / 6, H, K] keeps both splits
    assert specs["h_0/attn/query/kernel/q"] == ["fsdp", "tensor", None]
    assert sharded["fsdp2_tensor4"]["group_specs"]["h_0/attn/query/kernel/scale"] == \
        ["fsdp", "tensor", None]


# ---- loading and bad inputs ---------------------------------------------------------------------


def test_load_model_in_each_weights_kind(tmp_path):
    cfg = GPTConfig(**{**TINY, **FAMILIES["llama"]})
    params = init_params(cfg, jax.random.key(2))
    save_pretrained(cfg, params, tmp_path / "hf")
    ref = GPT(cfg).apply({"params": params}, IDS)
    for weights, group, kind in [("float32", None, jnp.float32), ("bfloat16", None, jnp.bfloat16),
                                 ("int8", None, jnp.int8), ("int8", 4, jnp.int8)]:
        config, loaded = load_model(tmp_path / "hf", weights=weights, weights_group=group)
        k = loaded["layers_0"]["mlp"]["up_proj"]["kernel"]
        assert (k["q"] if weights == "int8" else k).dtype == kind
        assert loaded["embed_tokens"]["embedding"].dtype == (
            jnp.bfloat16 if weights == "bfloat16" else jnp.float32)
        got = GPT(config).apply({"params": loaded}, IDS)
        np.testing.assert_allclose(got, ref, atol=2e-2 * float(jnp.abs(ref).max()))
        if weights == "int8":  # streamed and quantized leaf by leaf = quantized after loading
            want = quantize(params, "int8", group)
            for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(want)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="down_proj/kernel: quantization group 7 does not divide"):
        load_model(tmp_path / "hf", weights="int8", weights_group=7)  # before a weight is read


@pytest.mark.parametrize("kwargs, message", [
    (dict(weights="int4"), "weights must be one of float32, bfloat16, int8, got 'int4'"),
    (dict(weights="bfloat16", group=4), "a quantization group needs weights=int8"),
    (dict(weights="int8", group=0), "quantization group must be a positive integer, got 0"),
    (dict(weights="int8", group=5), "h_0/attn/c_proj/kernel: quantization group 5 does not "
                                    "divide the input width 12"),
    (dict(weights="int8", group=6), "h_0/attn/c_proj/kernel: quantization group 6 does not "
                                    "tile the input axes (3, 4)"),  # 12 = 3 heads of 4
])
def test_bad_inputs_raise_one_line(kwargs, message):
    params = init_params(GPTConfig(**TINY), jax.random.key(0))
    with pytest.raises(ValueError) as e:
        quantize(params, kwargs["weights"], kwargs.get("group"))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_already_quantized_and_bad_loads_are_refused(tmp_path):
    params = init_params(GPTConfig(**TINY), jax.random.key(0))
    with pytest.raises(ValueError, match="already quantized"):
        quantize(quantize(params, "int8"), "int8")
    # the kind is checked before the source is even looked at
    with pytest.raises(ValueError, match="weights must be one of"):
        load_model(tmp_path / "no-such-model", weights="fp8")


CLI_ARGS = {"generate": ["--prompt", "hi"], "chat": [], "serve": [], "eval": ["--tasks", "x"]}
CLI_NEEDS = {"serve": "uvicorn", "eval": "lm_eval"}


@pytest.mark.parametrize("cli", sorted(CLI_ARGS))
def test_cli_refuses_bad_weights_in_one_line(cli, tmp_path, capsys):
    import importlib

    if cli in CLI_NEEDS:
        pytest.importorskip(CLI_NEEDS[cli])
    main = importlib.import_module(f"jaxgpt.cli.{cli}").main
    model = ["--model", str(tmp_path / "no-such-model")]
    assert main(model + ["--weights", "int4"] + CLI_ARGS[cli]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: weights must be one of") and err.count("\n") == 1
    assert main(model + ["--weights", "int8", "--weights-group", "-3"] + CLI_ARGS[cli]) == 1
    assert "group must be a positive integer, got -3" in capsys.readouterr().err


# ---- the int8 tree on disk ----------------------------------------------------------------------


def test_int8_file_round_trip_and_refusals(tmp_path):
    from safetensors.numpy import save_file

    from jaxgpt.weights.quantized_files import QUANTIZED_FILE, load_quantized, save_quantized

    cfg = GPTConfig(**{**TINY, **FAMILIES["qwen3"]})
    q = quantize(init_params(cfg, jax.random.key(3)), "int8", 2)
    path = save_quantized(tmp_path / "int8", cfg, q, 2)
    assert path.name == QUANTIZED_FILE
    config, back = load_quantized(tmp_path / "int8")
    assert config == cfg
    for (pa, a), (pb, b) in zip(flatten(q).items(), flatten(back).items()):
        assert pa == pb and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(GPT(cfg).apply({"params": back}, IDS),
                                  GPT(cfg).apply({"params": q}, IDS))
    with pytest.raises(ValueError, match=r"scale is float32\[1, 12\], expected"):
        save_quantized(tmp_path / "x", cfg, quantize(init_params(cfg, jax.random.key(3)), "int8"), 2)
    with pytest.raises(FileNotFoundError, match=f"has no {QUANTIZED_FILE}"):
        load_quantized(tmp_path / "nothing")
    (tmp_path / "other").mkdir()
    save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "other" / QUANTIZED_FILE),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="is not a jaxgpt int8 file"):
        load_quantized(tmp_path / "other")
