"""Decode speed: jaxgpt's cached loop vs an uncached re-forward loop vs transformers' generate.

  python benchmarks/generate.py [--quick]
  python benchmarks/generate.py --batches 1,64 --new-tokens 256   # on a GPU (bfloat16 there)

GPT-2 small's shape with random weights, float32, greedy, the same prompts for every contender.
The transformers model holds jaxgpt's weights exported with `save_pretrained` and runs with as
many torch threads as this process may use and, as a check on contention for the cores, with
one. Contenders take turns, best time of each kept. The bandwidth bound: a decode step reads
every weight once plus the keys/values so far; a threaded numpy copy measures how many bytes
per second this machine moves (read + write), so the bound is an estimate. A tighter floor
for this compiler: the model's matmul shapes through XLA's own dots in a jitted loop, nothing
else (common.matmul_floor).

On a GPU both sides compute in bfloat16 (`--dtype`, default auto), transformers on the same GPU,
and the bandwidth is the device's datasheet HBM bandwidth (common.HBM_BYTES_PER_S, by device name):
the bound is tokens/s = batch x bandwidth / (weight bytes in the compute dtype + the KV cache
bytes of the average context). jaxgpt keeps float32 parameters and casts them in the step; a
second line runs it on parameters cast to the compute dtype first, which shows what the cast
costs. The uncached loop and the matmul floor run on CPU only (or with --all).
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import threading

# On a GPU, JAX would otherwise take 75% of its memory up front, leaving little to transformers.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import (  # noqa: E402  (benchmarks/common.py)
    HBM_BYTES_PER_S, hardware, interleaved_best, lookup, matmul_floor, timed, usable_cores)

from jaxgpt import GPT, GPTConfig, count_params, init_params  # noqa: E402
from jaxgpt.inference.generate import generate  # noqa: E402
from jaxgpt.models.model import head_logits  # noqa: E402
from jaxgpt.hostmem import retain_freed_memory  # noqa: E402
from jaxgpt.weights.huggingface import save_pretrained  # noqa: E402

retain_freed_memory()  # before the first JAX computation (jaxgpt/hostmem.py)


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

    return 2 * nbytes / min(timed(copy_all) for _ in range(5))


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(config, params, ids, last):
    hidden = GPT(config).apply({"params": params}, ids, return_hidden=True)  # [B, Tpad, D]
    return head_logits(params, config, hidden[:, last])  # [B, V]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 new tokens, one repeat")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 200 (32 with --quick)")
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=INT",
                        help="a GPTConfig size, e.g. n_layers=2 (for a dry run)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--all", action="store_true", help="also the uncached loop and the "
                        "matmul floor off CPU")
    args = parser.parse_args()
    new_tokens = args.new_tokens or (32 if args.quick else 200)
    repeats = 1 if args.quick else 3
    prompt_len = 16
    batches = [int(b) for b in args.batches.split(",")]
    cores = usable_cores()
    on_cpu = jax.default_backend() == "cpu"

    sizes = {k: int(v) for k, v in (o.split("=", 1) for o in args.override)}
    config = GPTConfig.preset(args.preset, qkv_bias=True, tie_embeddings=True, drop_rate=0.0,
                              dtype=args.dtype, **sizes)
    dt = config.compute_dtype
    # Random weights drawn on the host: compiling the initializer for a GPU took ~40 s on an H100.
    with jax.default_device(jax.devices("cpu")[0]):
        params = init_params(config, jax.random.key(0))
    params = jax.device_put(params, jax.devices()[0])
    cast = jax.tree.map(lambda x: x.astype(dt), params)  # what a bfloat16 checkpoint would hold
    prompts = np.random.default_rng(0).integers(0, config.vocab_size, (max(batches), prompt_len))
    prompts = prompts.astype(np.int32)

    import torch
    from transformers import GPT2LMHeadModel

    device = "cpu" if on_cpu else "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(config, params, tmp)
        hf = GPT2LMHeadModel.from_pretrained(tmp, dtype=getattr(torch, dt.name)).to(device).eval()
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    hf.generation_config.pad_token_id = 0

    def hf_generate(batch, threads, n=new_tokens):
        torch.set_num_threads(threads)
        ids = torch.tensor(prompts[:batch], dtype=torch.long, device=device)
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=n, min_new_tokens=n).cpu().numpy()

    kind = jax.devices()[0].device_kind
    if on_cpu:
        bandwidth, source = copy_bandwidth(threads=cores), f"numpy copy, {cores} threads, read + write"
    else:
        bandwidth, source = lookup(HBM_BYTES_PER_S, kind), f"datasheet HBM of {kind}"
    # Every weight is read once per step; of the position table only one row.
    n_read = count_params(params) - (config.context_length - 1) * config.emb_dim
    weight_bytes = n_read * dt.itemsize
    print(f"hardware: {hardware()}; torch {torch.__version__}")
    print(f"model: {args.preset} shape {sizes or ''}, {count_params(params) / 1e6:.1f}M parameters, "
          f"random, compute {dt.name} (transformers in {dt.name} on {device}); prompt {prompt_len} "
          f"tokens, {new_tokens} new tokens, greedy")
    print(f"bandwidth: {bandwidth / 1e9:.1f} GB/s ({source})" if bandwidth else
          f"bandwidth: unknown for {kind!r} (add it to common.HBM_BYTES_PER_S)")

    for batch in batches:
        ids = prompts[:batch]
        ours = functools.partial(generate, params, config, ids)
        same = float(np.mean(hf_generate(batch, cores)[:, prompt_len:] == ours(new_tokens)[:, prompt_len:]))
        contenders = {"jaxgpt cached": functools.partial(ours, new_tokens)}
        if dt != jnp.float32:
            contenders[f"jaxgpt cached, {dt.name} params"] = functools.partial(
                generate, cast, config, ids, new_tokens)
        contenders[f"transformers, {cores} threads" if on_cpu else "transformers generate"] = \
            functools.partial(hf_generate, batch, cores)
        if on_cpu:
            contenders["transformers, 1 thread"] = functools.partial(hf_generate, batch, 1)
        if on_cpu or args.all:
            contenders["XLA matmuls alone (floor)"] = matmul_floor(config, batch, new_tokens)
        t = interleaved_best(contenders, repeats)
        kv_bytes = 2 * config.n_layers * batch * (prompt_len + new_tokens / 2) * config.emb_dim * dt.itemsize
        bound = batch * bandwidth / (weight_bytes + kv_bytes) if bandwidth else float("nan")
        print(f"\nbatch {batch} (greedy tokens of transformers equal to jaxgpt's: {same:.0%}); "
              f"bytes per step: weights {weight_bytes / 1e6:.0f} MB + KV cache {kv_bytes / 1e6:.0f} MB "
              f"(average context) -> bound {bound:.1f} tokens/s:")
        for name, seconds in t.items():
            rate = batch * new_tokens / seconds
            print(f"  {name:32s} {rate:9.1f} tokens/s  ({rate / bound:4.0%} of the bandwidth bound)")
        peer = min(v for k, v in t.items() if k.startswith("transformers"))
        best = min(v for k, v in t.items() if k.startswith("jaxgpt"))
        print(f"  jaxgpt (best) / best transformers  {peer / best:6.2f}x")
        if "XLA matmuls alone (floor)" in t:
            print(f"  cached / XLA matmul floor          {t['XLA matmuls alone (floor)'] / t['jaxgpt cached']:6.2f}x")
        if on_cpu or args.all:
            # The uncached loop is slow enough for one timed run; it is compared with the cached
            # loop at the same number of new tokens (32 at batch > 1: re-forwards cost minutes).
            n_unc = new_tokens if batch == 1 or args.quick else 32
            t_unc = interleaved_best({"unc": functools.partial(uncached_generate, params, config, ids, n_unc),
                                      "cached": functools.partial(ours, n_unc)}, 1)
            print(f"  {'jaxgpt uncached':32s} {batch * n_unc / t_unc['unc']:9.1f} tokens/s  ({n_unc} new tokens)")
            print(f"  cached / uncached                  {t_unc['unc'] / t_unc['cached']:6.2f}x  (at {n_unc} new tokens)")


if __name__ == "__main__":
    main()
