"""Llama 3 and Qwen3 against transformers' own LlamaForCausalLM / Qwen3ForCausalLM: random tiny
models saved by save_pretrained (odd sizes, 3 and 2 query heads per kv head, tied and untied,
Llama 3 rope scaling on) load into jaxgpt and give HF's logits, gradients and greedy tokens."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxgpt.models.cache import init_cache  # noqa: E402
from jaxgpt.inference.generate import generate, generate_simple  # noqa: E402
from jaxgpt.weights.loader import load_model  # noqa: E402
from jaxgpt.models.model import GPT  # noqa: E402
from jaxgpt.weights.huggingface import (  # noqa: E402
    load_hf,
    load_pretrained,
    save_pretrained,
    to_hf_tensors,
)
from jaxgpt.weights.llama import config_from_hf, hf_config  # noqa: E402

V = 41


def _llama(tmp):
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        tie_word_embeddings=False, rms_norm_eps=1e-5)
    return cfg


def _qwen3(tmp):
    return transformers.Qwen3Config(
        vocab_size=V, hidden_size=24, intermediate_size=36, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=3, head_dim=10, max_position_embeddings=64,
        tie_word_embeddings=True, rope_theta=500.0)


_MODELS = {"llama": (_llama, transformers.LlamaForCausalLM),
           "qwen3": (_qwen3, transformers.Qwen3ForCausalLM)}


@pytest.fixture(scope="module", params=sorted(_MODELS))
def hf_model(request, tmp_path_factory):
    """(directory, torch model) of a random tiny model of the family, saved by transformers."""
    make_cfg, cls = _MODELS[request.param]
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp(request.param)
    model = cls(make_cfg(tmp)).eval()
    with torch.no_grad():  # norms start at 1: randomise them so a skipped norm cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp / "hf")
    return tmp / "hf", model


@pytest.fixture(scope="module")
def loaded(hf_model):
    config, params = load_pretrained(hf_model[0], dtype="float32")
    return config, params


def _ids(seed, b, t):
    return np.random.default_rng(seed).integers(0, V, (b, t))


def test_config_maps_the_family(hf_model, loaded):
    config, _ = loaded
    hf = hf_model[1].config
    assert config.family == hf.model_type
    assert (config.n_heads, config.kv_heads, config.head_dim, config.mlp_width) == (
        hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim, hf.intermediate_size)
    assert config.tie_embeddings == hf.tie_word_embeddings


def test_logits_match_transformers(hf_model, loaded):
    config, params = loaded
    ids = _ids(1, 3, 13)
    with torch.no_grad():
        ref = hf_model[1](torch.tensor(ids)).logits.numpy()
    ours = np.asarray(GPT(config).apply({"params": params}, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_gradients_match_transformers(hf_model, loaded):
    config, params = loaded
    ids = _ids(2, 2, 9)
    x, y = ids[:, :-1], ids[:, 1:]
    model = hf_model[1]
    model.zero_grad()
    logits = model(torch.tensor(x)).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.tensor(y).reshape(-1)).backward()
    ref = {n: p.grad.numpy() for n, p in model.named_parameters()}

    def loss(p):
        lg = GPT(config).apply({"params": p}, jnp.asarray(x))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), jnp.asarray(y)[..., None], -1))

    ours = to_hf_tensors(config, jax.grad(loss)(params))
    assert set(ours) == set(ref) - ({"lm_head.weight"} if config.tie_embeddings else set())
    for name, g in ours.items():
        scale = max(np.abs(ref[name]).max(), 1e-3)
        np.testing.assert_allclose(g / scale, ref[name] / scale, atol=1e-4, err_msg=name)


def test_greedy_generation_matches_transformers(hf_model, loaded):
    config, params = loaded
    prompt = _ids(3, 1, 6)
    with torch.no_grad():
        ref = hf_model[1].generate(torch.tensor(prompt), max_new_tokens=10, do_sample=False,
                                   eos_token_id=None, pad_token_id=0).numpy()[0, 6:]
    ours = generate(params, config, prompt, 10)[0, 6:]
    np.testing.assert_array_equal(ours, ref)


def test_left_padded_batch_equals_one_at_a_time_and_uncached(loaded):
    config, params = loaded
    prompts = [list(_ids(4, 1, 7)[0]), list(_ids(5, 1, 3)[0]), list(_ids(6, 1, 5)[0])]
    batch = generate(params, config, prompts, 9)[:, -9:]
    for row, p in zip(batch, prompts):
        np.testing.assert_array_equal(row, generate(params, config, [p], 9)[0, -9:])
        uncached = np.asarray(generate_simple(params, config, np.asarray([p]), 9))[0, len(p):]
        np.testing.assert_array_equal(row, uncached)


def test_cached_logits_equal_uncached(loaded):
    """Prefill 5 tokens, then feed 4 one at a time into a GQA cache holding only Hkv heads."""
    config, params = loaded
    ids = jnp.asarray(_ids(7, 2, 9))
    full = GPT(config).apply({"params": params}, ids)
    cache = init_cache(config, 2, 9)
    assert cache["k"].shape == (config.n_layers, 2, config.kv_heads, 9, config.head_dim)
    model = GPT(config)
    out, cache = model.apply({"params": params}, ids[:, :5], cache=cache, cache_index=0)
    steps = [out]
    for t in range(5, 9):
        out, cache = model.apply({"params": params}, ids[:, t:t + 1], cache=cache, cache_index=t)
        steps.append(out)
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-5)


def test_export_round_trip_and_sharded_save(hf_model, loaded, tmp_path):
    config, params = loaded
    ids = _ids(8, 2, 11)
    expect = np.asarray(GPT(config).apply({"params": params}, jnp.asarray(ids)))
    save_pretrained(config, params, tmp_path / "one")
    save_pretrained(config, params, tmp_path / "many", max_shard_size=4000)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    for d in ("one", "many"):
        c2, p2 = load_pretrained(tmp_path / d, dtype="float32")
        assert c2 == config
        np.testing.assert_array_equal(GPT(c2).apply({"params": p2}, jnp.asarray(ids)), expect)
        back = type(hf_model[1]).from_pretrained(tmp_path / d).eval()
        with torch.no_grad():
            np.testing.assert_allclose(back(torch.tensor(ids)).logits.numpy(), expect, atol=1e-4)


def test_scanned_and_untied_loads_give_the_same_logits(hf_model, loaded):
    config, params = loaded
    ids = jnp.asarray(_ids(9, 2, 7))
    expect = GPT(config).apply({"params": params}, ids)
    for overrides in (dict(scan_layers=True), dict(tie_embeddings=False)):
        c2, p2 = load_model(hf_model[0], dtype="float32", **overrides)
        np.testing.assert_allclose(GPT(c2).apply({"params": p2}, ids), expect, atol=1e-5)


def test_bfloat16_checkpoint_loads_as_bfloat16(hf_model, tmp_path):
    model = hf_model[1]
    type(model).from_pretrained(hf_model[0], dtype=torch.bfloat16).save_pretrained(tmp_path)
    c32, p32 = load_pretrained(tmp_path, dtype="float32")
    c16, p16 = load_hf(tmp_path, param_dtype="bfloat16", dtype="float32")
    assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
    for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32))  # bf16 exactly
    ids = jnp.asarray(_ids(13, 2, 7))  # bfloat16 weights run (float32 compute: the same logits)
    np.testing.assert_allclose(GPT(c16).apply({"params": p16}, ids),
                               GPT(c32).apply({"params": p32}, ids), atol=1e-5)


def test_bad_config_is_one_line(hf_model, tmp_path):
    hf = json.loads((hf_model[0] / "config.json").read_text())
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        config_from_hf({**hf, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="cannot override n_kv_heads"):
        config_from_hf(hf, n_kv_heads=1)


def test_sharded_mesh_steps_equal_single_device(hf_model):
    """Loaded straight into its shards on 4 CPU devices (a process of its own: the device count
    is fixed when JAX starts), two train steps equal the single-device ones."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).resolve().parents[2] / "tests" / "e2e" / "workers" / "family_sharded.py"
    proc = subprocess.run([sys.executable, str(worker), str(hf_model[0])], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for name in ("fsdp2_tensor2", "tensor4", "data4"):
        np.testing.assert_allclose(out[name]["losses"], out["reference"], rtol=1e-5)
        assert out[name]["param_diff"] < 1e-4, name
    specs = out["fsdp2_tensor2"]["specs"]
    assert specs["layers_0/self_attn/q_proj/kernel"] == ["fsdp", "tensor", None]
    assert specs["layers_0/mlp/gate_proj/kernel"] == ["fsdp", "tensor"]
    kv = hf_model[1].config.num_key_value_heads  # split over tensor=2 only where it divides
    assert specs["layers_0/self_attn/k_proj/kernel"] == ["fsdp", "tensor" if kv % 2 == 0 else None, None]


def test_generation_stops_on_any_of_several_eos_ids(loaded):
    """A family ends a turn on more than one token (e.g. <|eot_id|> and <|end_of_text|>)."""
    config, params = loaded
    prompts = [list(_ids(10, 1, 4)[0]), list(_ids(11, 1, 6)[0])]
    free = generate(params, config, prompts, 8)[:, -8:]
    stops = (int(free[0, 2]), int(free[1, 4]))  # each row's token at a different step
    got = generate(params, config, prompts, 8, eos_id=stops)[:, -8:]
    for row, f in zip(got, free):
        end = min(i for i, t in enumerate(f) if t in stops)
        np.testing.assert_array_equal(row[:end + 1], f[:end + 1])
        assert set(row[end + 1:].tolist()) <= {stops[0]}  # then padded with the first eos id
    simple = np.asarray(generate_simple(params, config, np.asarray([prompts[0]]), 8, eos_id=stops))
    np.testing.assert_array_equal(simple[0, 4:], got[0, :simple.shape[1] - 4])  # it stops at eos
    assert simple[0, -1] in stops


# ---- LoRA on the projections, PEFT export ------------------------------------------------------


def _random_b(trainable, seed=0):
    from jaxgpt.trees import flatten, unflatten

    flat = flatten(trainable["lora"])
    rng = np.random.default_rng(seed)
    flat = {p: (jnp.asarray(rng.normal(0, 0.3, x.shape), jnp.float32) if p.endswith("/b") else x)
            for p, x in flat.items()}
    return {"lora": unflatten(flat), "full": trainable["full"]}


@pytest.mark.parametrize("scan", [False, True])
def test_lora_peft_export_matches_in_peft(hf_model, loaded, tmp_path, scan):
    """Default targets adapt q/k/v/o and gate/up/down of every layer; factored training equals
    merged; the PEFT export gives the same logits on LlamaForCausalLM / Qwen3ForCausalLM."""
    peft = pytest.importorskip("peft")
    from jaxgpt.lora import transform as lora
    from jaxgpt.lora.adapters import export_peft
    from jaxgpt.trees import flatten

    config, params = load_model(hf_model[0], dtype="float32", scan_layers=True) if scan else loaded
    cfg = lora.LoRAConfig(rank=2, alpha=3.0, include_head=not config.tie_embeddings)
    trainable, frozen = lora.partition(params, cfg, jax.random.key(1))
    trainable = _random_b(trainable)
    names = {part for p in flatten(trainable["lora"]) for part in p.split("/")}
    assert names >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    ids = _ids(12, 2, 9)
    x, y = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])

    def base_loss(p, frozen_, batch, rng, det):
        lg = GPT(config).apply({"params": p}, batch[0])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), batch[1][..., None], -1))

    g_f = jax.grad(lora.lora_loss_fn(base_loss, cfg))(trainable, frozen, (x, y), None, True)
    g_m = jax.grad(lora.lora_loss_fn(base_loss, cfg, factored=False))(trainable, frozen, (x, y), None, True)
    for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_m)):
        np.testing.assert_allclose(a, b, atol=1e-5)

    export_peft(tmp_path / "adapter", trainable, cfg, config, str(hf_model[0]))
    model = peft.PeftModel.from_pretrained(type(hf_model[1]).from_pretrained(hf_model[0]),
                                           tmp_path / "adapter").eval()
    want = GPT(config).apply({"params": lora.combine(trainable, frozen, cfg)}, jnp.asarray(ids))
    assert not np.allclose(want, GPT(config).apply({"params": params}, jnp.asarray(ids)), atol=1e-3)
    with torch.no_grad():
        got = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_family_config_errors_are_one_line():
    from jaxgpt.config import GPTConfig

    base = dict(family="llama", vocab_size=17, emb_dim=12, n_heads=3, n_layers=1)
    with pytest.raises(ValueError, match="n_heads=3 is not divisible by n_kv_heads=2"):
        GPTConfig(**base, n_kv_heads=2)
    with pytest.raises(ValueError, match="head width 5 is odd"):
        GPTConfig(**base, head_width=5)
    with pytest.raises(ValueError, match="n_kv_heads is for the llama/qwen3 families"):
        GPTConfig(vocab_size=17, emb_dim=12, n_heads=3, n_layers=1, n_kv_heads=1)
    with pytest.raises(ValueError, match="GPTConfig.family must be one of"):
        GPTConfig(**{**base, "family": "gemma"})
    assert GPTConfig(**base, head_width=6).head_dim == 6  # Qwen3: K apart from D / H


def test_config_json_of_older_transformers_maps_the_same():
    """Llama 3.2's config.json as released (rope_scaling beside rope_theta, bfloat16, eos list)."""
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
          "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
          "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
          "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
          "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"},
          "tie_word_embeddings": True, "torch_dtype": "bfloat16", "eos_token_id": [128001, 128008, 128009],
          "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "pretraining_tp": 1}
    c = config_from_hf(hf)
    assert (c.rope_theta, c.rope_factor, c.rope_original_context, c.kv_heads, c.head_dim) == \
        (500000.0, 32.0, 8192, 8, 64)
    new = hf_config(c)
    assert config_from_hf(new) == c
    ref = transformers.LlamaConfig(**{k: v for k, v in new.items() if k != "model_type"})
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from jaxgpt.models.layers import rope_frequencies

    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](ref, "cpu")
    np.testing.assert_allclose(rope_frequencies(c), inv.numpy(), rtol=1e-6)  # Llama 3 scaling
