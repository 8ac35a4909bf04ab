"""LoRA against full finetuning: trainable parameters, optimizer state, FLOPs, memory, step time.

Three variants of one GPT-2-shaped model (random weights, tied head, qkv biases) train on the
same batch through the same jitted `train_step` (`compile_steps`, explicit shardings, donated
state): full finetuning; LoRA whose loss merges W + scale A @ B every step ("lora-merged"); and
LoRA's default factored loss ("lora"). FLOPs and memory come from XLA's compiled executable
(`cost_analysis`, `memory_analysis`: arguments + outputs - aliased + temporaries). Steps run
interleaved across the variants, so a busy shared CPU slows all alike; each step records wall
time and this process's CPU time (all threads), which other processes' load disturbs less, and
the step-time ratio is the median over rounds of the ratio within a round.

    python benchmarks/lora.py            # GPT-2 small and medium shapes, context 256, batch 2
    python benchmarks/lora.py --quick    # a tiny model, seconds
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import compiled_stats, hardware  # noqa: E402  (benchmarks/common.py)

from jaxgpt.lora import transform as lora  # noqa: E402
from jaxgpt.config import GPTConfig  # noqa: E402
from jaxgpt.hostmem import retain_freed_memory  # noqa: E402
from jaxgpt.lora.adapters import base_fingerprint  # noqa: E402
from jaxgpt.models.model import (  # noqa: E402
    abstract_params,  # noqa: E402
    count_params,
    init_params,
)
from jaxgpt.sharding import MeshConfig, boxed_shardings, make_mesh  # noqa: E402
from jaxgpt.training.losses import lm_loss_fn  # noqa: E402
from jaxgpt.training.optim import make_optimizer, schedule  # noqa: E402
from jaxgpt.training.runconfig import OptimConfig  # noqa: E402
from jaxgpt.training.state import init_state, state_shardings  # noqa: E402
from jaxgpt.training.step import compile_steps  # noqa: E402

retain_freed_memory()  # before the first JAX computation (jaxgpt/hostmem.py)

VARIANTS = ("full", "lora-merged", "lora")


def build(variant: str, cfg: GPTConfig, params, lcfg: lora.LoRAConfig, tx, mesh, batch):
    """(compiled step, state, frozen, stats) for one variant."""
    base_loss = lm_loss_fn(cfg)
    boxed = abstract_params(cfg)
    if variant == "full":
        loss, trainable, frozen, frozen_sh = base_loss, jax.tree.map(jnp.copy, params), None, None
    else:
        trainable, frozen = lora.partition(params, lcfg, jax.random.key(1))
        boxed, frozen_boxed = lora.boxed_trees(boxed, lcfg)
        frozen_sh = boxed_shardings(frozen_boxed, mesh)
        frozen = jax.device_put(frozen, frozen_sh)
        loss = lora.lora_loss_fn(base_loss, lcfg, factored=variant == "lora")
    state_sh = state_shardings(boxed, tx, mesh)
    state = jax.jit(lambda p: init_state(p, tx, 0), out_shardings=state_sh)(trainable)
    train, _ = compile_steps(loss, tx, schedule(OptimConfig(), 100), state_sh, mesh, frozen_sh)
    compiled = train.lower(state, batch, frozen).compile()
    stats = {
        "trainable": count_params(state.params),
        "opt_bytes": sum(x.nbytes for x in jax.tree.leaves(state.opt_state)),
        **compiled_stats(compiled),
        "times": [],
        "cpu": [],
    }
    return compiled, state, frozen, stats


def run_model(name: str, cfg: GPTConfig, args) -> None:
    params = init_params(cfg, jax.random.key(0))
    lcfg = lora.LoRAConfig(rank=args.rank, alpha=2.0 * args.rank)
    tx = make_optimizer(OptimConfig(), 100)
    mesh = make_mesh(MeshConfig())
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.batch, cfg.context_length + 1))
    batch = {"inputs": jnp.asarray(ids[..., :-1], jnp.int32), "targets": jnp.asarray(ids[..., 1:], jnp.int32)}
    runs = {v: build(v, cfg, params, lcfg, tx, mesh, batch) for v in VARIANTS}
    for v in VARIANTS:  # one warm-up step each (first-call overheads)
        step, state, frozen, stats = runs[v]
        state, m = step(state, batch, frozen)
        jax.block_until_ready(m)
        runs[v] = (step, state, frozen, stats)
    for _ in range(args.reps):
        for v in VARIANTS:  # interleaved, so load on the shared machine hits every variant
            step, state, frozen, stats = runs[v]
            t0, c0 = time.perf_counter(), time.process_time()
            state, m = step(state, batch, frozen)
            jax.block_until_ready(m)
            stats["times"].append(time.perf_counter() - t0)
            stats["cpu"].append(time.process_time() - c0)
            runs[v] = (step, state, frozen, stats)
    print(f"\n{name}: {count_params(params):,} parameters, batch {args.batch} x {cfg.context_length} "
          f"tokens, LoRA rank {args.rank} on {', '.join(lcfg.targets)}")
    print(f"{'variant':<12} {'trainable':>13} {'opt state MiB':>14} {'GFLOP/step':>11} {'peak MiB':>9} "
          f"{'temp MiB':>9} {'wall s':>7} {'CPU s':>7}  wall s of each round")
    s = {v: runs[v][3] for v in VARIANTS}
    for v in VARIANTS:
        x = s[v]
        print(f"{v:<12} {x['trainable']:>13,} {x['opt_bytes'] / 2**20:>14.2f} {x['gflop']:>11.1f} "
              f"{x['peak_mib']:>9.0f} {x['temp_mib']:>9.0f} {statistics.median(x['times']):>7.3f} "
              f"{statistics.median(x['cpu']):>7.3f}  " + " ".join(f"{t:.3f}" for t in x["times"]))
    t0 = time.perf_counter()
    base_fingerprint(runs["lora"][2], lcfg)  # what save_adapters/load_adapters pay per call
    hash_s = time.perf_counter() - t0

    def ratio(v: str, key: str) -> float:  # median over rounds of v / full within the round
        return statistics.median(a / b for a, b in zip(s[v][key], s["full"][key]))

    f, lo = s["full"], s["lora"]
    print(f"ratios  optimizer state full/lora = {f['opt_bytes'] / lo['opt_bytes']:.1f}x (goal >= 40x); "
          f"trainable full/lora = {f['trainable'] / lo['trainable']:.1f}x")
    print(f"        step time lora/full = {ratio('lora', 'times'):.2f} wall, {ratio('lora', 'cpu'):.2f} CPU "
          f"(goal <= 0.8); lora-merged/full = {ratio('lora-merged', 'times'):.2f} wall, "
          f"{ratio('lora-merged', 'cpu'):.2f} CPU")
    print(f"        FLOPs lora/full = {lo['gflop'] / f['gflop']:.2f}; "
          f"lora-merged/full = {s['lora-merged']['gflop'] / f['gflop']:.2f}; "
          f"peak memory lora/full = {lo['peak_mib'] / f['peak_mib']:.2f}")
    print(f"        base-weights sha256 for an adapters checkpoint: {hash_s:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model instead of GPT-2 shapes")
    ap.add_argument("--models", default="gpt2-small,gpt2-medium")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(f"hardware: {hardware()}")
    print("timings on a shared machine are noisy; variants run interleaved, medians reported")
    common = dict(context_length=args.context, drop_rate=0.0, qkv_bias=True, tie_embeddings=True)
    if args.quick:
        models = {"tiny": GPTConfig(vocab_size=503, emb_dim=64, n_heads=4, n_layers=2, **{
            **common, "context_length": min(args.context, 32)})}
    else:
        models = {m: GPTConfig.preset(m, **common) for m in args.models.split(",")}
    for name, cfg in models.items():
        run_model(name, cfg, args)
    print(f"\nprocess max RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
