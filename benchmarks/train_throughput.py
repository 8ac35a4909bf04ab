"""Training throughput: jaxgpt's compiled train step vs transformers' GPT-2 in PyTorch.

  python benchmarks/train_throughput.py --preset gpt2-small --context 256 --batch 2
  python benchmarks/train_throughput.py --dtype bfloat16           # jax computes in bf16
  python benchmarks/train_throughput.py --no-peer --mesh data=8    # jax only, e.g. on a GPU box
  python benchmarks/train_throughput.py --dtype bfloat16 --peer compiled  # torch.compile peer
  python benchmarks/train_throughput.py --compile-cache DIR        # persistent compilation cache

The contenders are train_peers.py's. The peer always computes in float32; with `--dtype
bfloat16` a second peer line runs it under torch.autocast(bfloat16); `--peer compiled` replaces
them with torch.compile + autocast bf16 + SDPA flash + fused AdamW. Contenders are timed step
by step in rotating order and each figure is a median. Where a step's time goes:
train_breakdown.py; float32 against bfloat16 losses: train_loss_curve.py.

FLOPs per token (common.flops_per_token): 6 N + 12 L H K T, where N counts the parameters that
take part in a matmul -- every parameter except the token and position embedding tables
(lookups, no FLOPs), with the output head counted (once, also when tied). MFU = achieved FLOP/s
/ peak FLOP/s of all devices used; peak comes from `--peak-tflops`, else the datasheet table
(common.PEAK_TFLOPS), else -- on CPU -- a 2048^3 matmul measured in this run in the compute
dtype (the faster of jnp.dot and torch.mm), which is what this machine actually reaches.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

from train_peers import (  # noqa: I001  (first: it sets JAX's memory options before JAX starts)
    JaxContender, TorchContender, add_run_args, attention_path, make_config, parse_mesh, start,
    text_batches)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import (  # noqa: E402  (benchmarks/common.py)
    PEAK_TFLOPS, best_time, flops_per_token, interleaved_steps, lookup, matmul_params)

from jaxgpt.models.model import count_params  # noqa: E402
from jaxgpt.sharding import make_mesh  # noqa: E402


def jax_matmul_flops(dtype, n: int = 2048, repeats: int = 4) -> float:
    """A square matmul with a float32 result, the form the model's matmuls take (on XLA:CPU a
    bfloat16 dot with a bfloat16 result is upcast to float32 and runs ~5x slower)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(functools.partial(jnp.dot, preferred_element_type=jnp.float32))
    return 2 * n**3 / best_time(lambda: f(a, a).block_until_ready(), repeats)


def torch_matmul_flops(torch, dtype: str, device: str, n: int = 2048, repeats: int = 4) -> float:
    a = torch.ones((n, n), dtype=getattr(torch, dtype), device=device)

    def run():
        a @ a
        if device == "cuda":
            torch.cuda.synchronize()

    return 2 * n**3 / best_time(run, repeats)


def peak_flops(args, dtype: str, torch) -> tuple[float, str]:
    """Peak FLOP/s of all jax devices together, and where the number comes from."""
    n_dev = jax.device_count()
    if args.peak_tflops:
        return args.peak_tflops * 1e12 * n_dev, f"--peak-tflops {args.peak_tflops} x {n_dev} device(s)"
    kind = jax.devices()[0].device_kind
    peaks = lookup(PEAK_TFLOPS, kind)
    if peaks:
        return peaks[dtype] * 1e12 * n_dev, (
            f"datasheet dense {dtype} peak of {kind}: {peaks[dtype]} TFLOP/s x {n_dev}")
    if jax.default_backend() != "cpu":
        measured = jax_matmul_flops(getattr(jnp, dtype), n=8192) * n_dev
        return measured, f"measured jnp.dot 8192^3 {dtype} (device not in the table)"
    found = {"jnp.dot (f32 result)": jax_matmul_flops(getattr(jnp, dtype))}
    if torch is not None:
        found["torch.mm"] = torch_matmul_flops(torch, dtype, "cpu")
    best = max(found, key=found.get)
    detail = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in found.items())
    return found[best], f"CPU estimate: 2048^3 {dtype} matmul measured in this run ({detail}); best used"



def throughput(args, torch) -> None:
    config = make_config(args, args.dtype)
    mesh = make_mesh(parse_mesh(args.mesh))
    tokens = args.batch * args.context
    batches = text_batches(args.warmup + args.steps, args.batch, args.context, config.vocab_size)
    path = f"kernels {config.kernels}: {attention_path(config, args)}"
    print(f"config: {args.preset}, context {args.context}, batch {args.batch} ({tokens} tokens/step), "
          f"compute {config.compute_dtype.name}, dropout {config.drop_rate} (attention "
          f"{config.attention_drop_rate}), attention {path}, vocabulary {config.vocab_size} padded "
          f"to {config.padded_vocab_size}, loss_chunk {config.loss_chunk}, "
          f"remat {config.remat_policy}, scan_layers {config.scan_layers}, "
          f"{'tied' if config.tie_embeddings else 'untied'} head, mesh {dict(mesh.shape)}")

    jx = JaxContender(config, mesh, batches)
    n_all = count_params(jx.state.params)
    n_mm = matmul_params(jx.state.params, config)
    fpt = flops_per_token(n_mm, config, args.context)
    print(f"params: {n_all:,} in jax; FLOPs/token = 6N + 12 L H Q T = 6 x {n_mm:,} + 12 x "
          f"{config.n_layers} x {config.n_heads} x {config.head_dim} x {args.context} = {fpt / 1e9:.3f} GFLOP "
          f"(N = all params except the wte/wpe lookup tables, head counted once)")
    print(f"jax: state init {jx.init_s:.1f} s, trace+lower {jx.lower_s:.1f} s, compile {jx.compile_s:.1f} s")
    try:  # XLA's own account of the step's scratch memory (activations, logits, gradients)
        print(f"jax: train step scratch memory {jx.step_fn.memory_analysis().temp_size_in_bytes / 2**30:.2f} GiB")
    except (AttributeError, NotImplementedError, TypeError):
        pass

    contenders = [jx]
    if torch is not None and args.peer == "compiled":
        peer = TorchContender(torch, config, batches, autocast=args.dtype == "bfloat16", compiled=True)
        t0 = time.perf_counter()
        try:
            peer.step(0)  # torch.compile compiles on the first call
        except Exception as err:  # flash-only SDPA refused this model's call: say so, run SDPA's choice
            print(f"{peer.name}: flash-only SDPA failed ({str(err).strip().splitlines()[0][:160]}); "
                  "rerunning with SDPA's own choice")
            peer.sdpa, peer.name = contextlib.nullcontext, peer.name + " (SDPA default)"
            peer.opt.zero_grad(set_to_none=True)
            peer.step(0)
        print(f"{peer.name}: params {peer.n_params:,}, attention {peer.attention}"
              f"{' (flash only)' if peer.device == 'cuda' else ''}, AdamW fused, device "
              f"{peer.device}, first step (compiles) {time.perf_counter() - t0:.1f} s")
        contenders.append(peer)
    elif torch is not None:
        peer = TorchContender(torch, config, batches)
        print(f"torch params: {peer.n_params:,}, attention {peer.attention}, AdamW fused, "
              f"device {peer.device}"
              + ("  (same as jax)" if peer.n_params == n_all else "  (DIFFERS from jax)"))
        contenders.append(peer)
        if args.dtype == "bfloat16":
            contenders.append(TorchContender(torch, config, batches, autocast=True))
    times = interleaved_steps(contenders, args.steps, args.warmup)

    peak, source = peak_flops(args, args.dtype, torch)
    print(f"peak: {peak / 1e12:.3f} TFLOP/s ({source})")
    print(f"\n{'contender':30s} {'step time':56s} {'tokens/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s}")
    rate = {}
    for c in contenders:
        med = statistics.median(times[c.name])
        rate[c.name] = tokens / med
        achieved = fpt * tokens / med
        print(f"{c.name:30s} {_spread(times[c.name]):56s} {rate[c.name]:9.1f} "
              f"{achieved / 1e12:8.3f} {achieved / peak:6.1%}")
    print("losses (first -> last timed step): "
          + "; ".join(f"{c.name} {c.losses[0]:.3f} -> {c.losses[-1]:.3f}" for c in contenders))
    for c in contenders[1:]:
        print(f"ratio tokens/s  {jx.name} / {c.name}: {rate[jx.name] / rate[c.name]:.2f}x")
    for c in contenders[1:]:
        parts = ", ".join(f"{k} {statistics.median(v) * 1e3:.0f} ms" for k, v in c.phases.items())
        print(f"{c.name} phases (median): {parts}")


def _spread(ts: list[float]) -> str:
    return (f"median {statistics.median(ts) * 1e3:8.1f} ms (min {min(ts) * 1e3:.1f}, "
            f"max {max(ts) * 1e3:.1f}, n={len(ts)})")


def parse_args(argv=None):
    p = add_run_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="jax compute dtype (params stay float32); the peer runs float32")
    p.add_argument("--steps", type=int, default=8, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps per contender (on CPU the second step still maps fresh "
                        "host memory after the peer's first allocations)")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU")
    p.add_argument("--peer", choices=("eager", "compiled"), default="eager",
                   help="eager: torch float32 (+ autocast bf16); compiled: torch.compile + "
                        "autocast bf16 + SDPA flash + fused AdamW")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch = start(args)
    t0 = time.perf_counter()
    throughput(args, torch)
    print(f"\nwall time of this invocation: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
