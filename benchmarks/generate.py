"""Decode speed: jaxgpt's cached loop vs an uncached re-forward loop vs transformers' generate.

  python benchmarks/generate.py [--quick]

GPT-2 small's shape with random weights, float32, greedy, the same prompts for every contender.
The transformers model holds jaxgpt's weights exported with `save_pretrained` and runs with as
many torch threads as this process may use and, as a check on contention for the cores, with
one. Contenders take turns, best time of each kept. The bandwidth bound: a decode step reads
every weight once plus the keys/values so far; a threaded numpy copy measures how many bytes
per second this machine moves (read + write), so the bound is an estimate. A tighter floor
for this compiler: the same weights through XLA's own matmuls in a jitted loop, nothing else.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxgpt import GPT, GPTConfig, count_params, init_params
from jaxgpt.generation import _head, generate
from jaxgpt.hostmem import retain_freed_memory  # noqa: E402
from jaxgpt.pretrained import save_pretrained

retain_freed_memory()  # before the first JAX computation (jaxgpt/hostmem.py)


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}; {len(os.sched_getaffinity(0))} usable cores (load average {load:.1f}); "
            f"jax {jax.__version__} on {jax.devices()[0].device_kind}")


def copy_bandwidth(nbytes: int = 256 << 20, threads: int = 1) -> float:
    """Bytes moved per second (read + write) by a numpy copy split over threads, best of five."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.zeros_like(src)  # touch the pages now, not inside the timing
    parts = np.array_split(np.arange(src.size), threads)

    def copy_all():
        jobs = [threading.Thread(target=np.copyto, args=(dst[p[0]:p[-1] + 1], src[p[0]:p[-1] + 1]))
                for p in parts]
        for j in jobs:
            j.start()
        for j in jobs:
            j.join()

    return 2 * nbytes / min(_timed(copy_all) for _ in range(5))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_best(contenders: dict, repeats: int) -> dict:
    """Best time of each contender over `repeats` rounds, taking turns so that a burst of load
    from other processes hits all of them alike (after one untimed warm-up run each)."""
    for fn in contenders.values():
        fn()
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(repeats):
        for name, fn in contenders.items():
            best[name] = min(best[name], _timed(fn))
    return best


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(config, params, ids, last):
    hidden = GPT(config).apply({"params": params}, ids, return_hidden=True)  # [B, Tpad, D]
    return _head(params, config, hidden[:, last])  # [B, V]


def uncached_generate(params, config, prompt, new_tokens, bucket=32):
    """The book's loop made fair: re-run the whole sequence per token, but jitted once per
    `bucket`-token length (right padding is inert under the causal mask) and with the output
    head applied at the last real position only."""
    B, T0 = prompt.shape
    total = T0 + new_tokens
    buf = np.zeros((B, -(-total // bucket) * bucket), np.int32)
    buf[:, :T0] = prompt
    for t in range(T0, total):
        width = -(-t // bucket) * bucket
        logits = _last_logits(config, params, jnp.asarray(buf[:, :width]), t - 1)
        buf[:, t] = np.asarray(jnp.argmax(logits, axis=-1))
    return buf[:, :total]


def matmul_floor(params, config, batch: int, steps: int):
    """`steps` decode steps' worth of XLA matmuls alone, in a jitted loop: per layer the query,
    key and value kernels on x, the attention output projection on their sum, the MLP's two
    kernels in turn, then the tied head; the same dependencies as the model, nothing else. No
    decoder built from XLA's dots can beat it: it separates what the compiler's matmuls cost
    from what ours adds (attention over the cache, LayerNorms, sampling, the loop)."""
    L, H, K, D = config.n_layers, config.n_heads, config.head_dim, config.emb_dim
    layers = [params[f"h_{i}"] for i in range(L)]
    kernels = [(*(a["attn"][n]["kernel"].reshape(D, H * K) for n in ("query", "key", "value")),
                a["attn"]["c_proj"]["kernel"].reshape(H * K, D),
                a["mlp"]["c_fc"]["kernel"], a["mlp"]["c_proj"]["kernel"]) for a in layers]
    wte = params["wte"]["embedding"]  # [V, D]

    @jax.jit
    def run(kernels, wte, x):
        def step(_, x):  # x [B, D]
            for wq, wk, wv, wo, wfc, wproj in kernels:
                x = x + (x @ wq + x @ wk + x @ wv) @ wo * 1e-3
                x = x + jax.nn.gelu(x @ wfc) @ wproj * 1e-3
            logits = jnp.einsum("bd,vd->bv", x, wte)
            return x * 0.5 + logits[:, :D] * 1e-3
        return lax.fori_loop(0, steps, step, x)

    x = jnp.ones((batch, D), jnp.float32)
    return lambda: run(kernels, wte, x).block_until_ready()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 new tokens, one repeat")
    args = parser.parse_args()
    new_tokens = 32 if args.quick else 200
    uncached_tokens = {1: new_tokens, 8: 32}  # batch 8 re-forwards cost minutes at 200 tokens
    repeats = 1 if args.quick else 3
    prompt_len = 16
    cores = len(os.sched_getaffinity(0))

    config = GPTConfig.preset("gpt2-small", qkv_bias=True, tie_embeddings=True, drop_rate=0.0)
    params = init_params(config, jax.random.key(0))
    prompts = np.random.default_rng(0).integers(0, config.vocab_size, (8, prompt_len)).astype(np.int32)

    import torch
    from transformers import GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(config, params, tmp)
        hf = GPT2LMHeadModel.from_pretrained(tmp).eval()
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    hf.generation_config.pad_token_id = 0

    def hf_generate(batch, threads, n=new_tokens):
        torch.set_num_threads(threads)
        ids = torch.tensor(prompts[:batch], dtype=torch.long)
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=n, min_new_tokens=n).numpy()

    bandwidth = copy_bandwidth(threads=cores)
    # Every weight is read once per step; of the position table only one row.
    weight_bytes = (count_params(params) - (config.context_length - 1) * config.emb_dim) * 4
    print(f"hardware: {hardware()}; torch {torch.__version__}")
    print(f"model: GPT-2 small shape, {count_params(params) / 1e6:.1f}M float32 parameters, random; "
          f"prompt {prompt_len} tokens, {new_tokens} new tokens, greedy")
    print(f"numpy copy bandwidth ({cores} threads, read + write): {bandwidth / 1e9:.1f} GB/s")

    for batch in (1, 8):
        ids = prompts[:batch]
        n_unc = uncached_tokens[batch] if not args.quick else new_tokens
        ours = functools.partial(generate, params, config, ids)
        same = float(np.mean(hf_generate(batch, cores)[:, prompt_len:] == ours(new_tokens)[:, prompt_len:]))
        contenders = {
            "jaxgpt cached": functools.partial(ours, new_tokens),
            f"transformers, {cores} threads": functools.partial(hf_generate, batch, cores),
            "transformers, 1 thread": functools.partial(hf_generate, batch, 1),
            "XLA matmuls alone (floor)": matmul_floor(params, config, batch, new_tokens),
        }
        t = interleaved_best(contenders, repeats)
        # The uncached loop is slow enough for one timed run; it is compared with the cached
        # loop at the same number of new tokens.
        t_unc = interleaved_best({"unc": functools.partial(uncached_generate, params, config, ids, n_unc),
                                  "cached": functools.partial(ours, n_unc)}, 1)
        kv_bytes = 2 * config.n_layers * batch * (prompt_len + new_tokens / 2) * config.emb_dim * 4
        bound = batch * bandwidth / (weight_bytes + kv_bytes)  # tokens/s if reads ran at copy speed
        print(f"\nbatch {batch} (greedy tokens of transformers equal to jaxgpt's: {same:.0%}):")
        for name, seconds in t.items():
            rate = batch * new_tokens / seconds
            print(f"  {name:28s} {rate:7.1f} tokens/s  ({rate / bound:4.0%} of the bandwidth bound "
                  f"{bound:.1f} tokens/s)")
        print(f"  {'jaxgpt uncached':28s} {batch * n_unc / t_unc['unc']:7.1f} tokens/s  ({n_unc} new tokens)")
        peer = min(v for k, v in t.items() if k.startswith("transformers"))
        print(f"  cached / XLA matmul floor     {t['XLA matmuls alone (floor)'] / t['jaxgpt cached']:5.2f}x")
        print(f"  cached / best transformers   {peer / t['jaxgpt cached']:5.2f}x")
        print(f"  cached / uncached            {t_unc['unc'] / t_unc['cached']:5.2f}x  (at {n_unc} new tokens)")

if __name__ == "__main__":
    main()
