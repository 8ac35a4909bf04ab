"""A DPO step against an instruction-tuning step of the same batch, and the stored reference
against the live one: step time, FLOPs and memory.

Four variants train one model (random weights) through the same jitted `train_step`
(`compile_steps`, explicit shardings, donated state): instruction tuning on the batch's B chosen
sequences (the masked next-token loss); DPO with the live reference (a frozen copy of the
weights beside the policy: 2B sequences through the policy, forward and backward, and 2B through
the reference, forward only); DPO with the stored reference (its log-probabilities come with
the batch: no reference pass, no second copy); and DPO with LoRA (the frozen base is the
reference). FLOPs and memory are XLA's (`cost_analysis`, `memory_analysis`: arguments +
outputs - aliased + temporaries). Steps run interleaved, medians reported.

    python benchmarks/preference.py            # GPT-2 small's shape, context 256, 4 pairs
    python benchmarks/preference.py --quick    # a tiny model, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import compiled_stats, hardware  # noqa: E402  (benchmarks/common.py)

from jaxgpt.config import GPTConfig  # noqa: E402
from jaxgpt.hostmem import retain_freed_memory  # noqa: E402
from jaxgpt.lora import transform as lora  # noqa: E402
from jaxgpt.models.model import abstract_params, init_params  # noqa: E402
from jaxgpt.sharding import MeshConfig, boxed_shardings, make_mesh  # noqa: E402
from jaxgpt.tasks.instruct.data import collate  # noqa: E402
from jaxgpt.tasks.preference.loss import Objective, pair_count, preference_loss_fn  # noqa: E402
from jaxgpt.training.losses import lm_loss_fn  # noqa: E402
from jaxgpt.training.optim import make_optimizer, schedule  # noqa: E402
from jaxgpt.training.runconfig import OptimConfig  # noqa: E402
from jaxgpt.training.state import init_state, state_shardings  # noqa: E402
from jaxgpt.training.step import compile_steps  # noqa: E402

retain_freed_memory()  # before the first JAX computation (jaxgpt/hostmem.py)

VARIANTS = ("instruct", "dpo-live", "dpo-stored", "dpo-lora")


def pair_batches(cfg: GPTConfig, pairs: int, seed: int = 0) -> tuple[dict, dict]:
    """(instruction batch of the B chosen rows [1, B, T], preference batch [1, B, 2, T])."""
    rng = np.random.default_rng(seed)
    t = cfg.context_length
    rows, prompts = [], []
    for _ in range(pairs):
        prompt = rng.integers(0, cfg.vocab_size, t // 3).tolist()
        for _ in range(2):
            rows.append(prompt + rng.integers(0, cfg.vocab_size, rng.integers(t // 3, t - t // 3)).tolist())
            prompts.append(len(prompt))
    b = collate(rows, prompts, pad_id=0, length=t, allowed_max_length=t, mask_prompt=True)
    pref = {k: v.reshape(1, pairs, 2, t) for k, v in b.items()}
    pref["pairs"] = np.ones((1, pairs, 1), np.int32)
    pref["ref_logps"] = rng.normal(-50, 5, (1, pairs, 2)).astype(np.float32)
    instruct = {k: v[:, :, 0] for k, v in pref.items() if k in ("inputs", "targets")}
    return instruct, pref


def build_variant(variant: str, cfg: GPTConfig, params, tx, mesh, batch):
    """(compiled step, state, frozen, stats) for one variant."""
    boxed, frozen, frozen_sh, units = abstract_params(cfg), None, None, pair_count
    trainable = params
    if variant == "instruct":
        loss, units = lm_loss_fn(cfg), None
    elif variant == "dpo-lora":
        lcfg = lora.LoRAConfig(rank=16, alpha=32.0)
        trainable, frozen = lora.partition(params, lcfg, jax.random.key(1))
        boxed, frozen_boxed = lora.boxed_trees(boxed, lcfg)
        frozen_sh = boxed_shardings(frozen_boxed, mesh)
        loss = preference_loss_fn(cfg, Objective(), stored=False, lora=lcfg)
    else:
        stored = variant == "dpo-stored"
        loss = preference_loss_fn(cfg, Objective(), stored=stored)
        if not stored:
            frozen_sh = boxed_shardings(boxed, mesh)
            frozen = params  # the reference: a second copy on the device
    if frozen is not None:
        frozen = jax.device_put(frozen, frozen_sh)
    state_sh = state_shardings(boxed, tx, mesh)
    trainable = jax.tree.map(lambda x: np.array(x), trainable)  # each variant its own buffers
    state = jax.jit(lambda p: init_state(p, tx, 0), out_shardings=state_sh)(trainable)
    train, _ = compile_steps(loss, tx, schedule(OptimConfig(), 100), state_sh, mesh, frozen_sh, units)
    compiled = train.lower(state, batch, frozen).compile()
    return compiled, state, frozen, {**compiled_stats(compiled), "times": []}


def run_variants(name: str, cfg: GPTConfig, args) -> None:
    params = jax.device_get(init_params(cfg, jax.random.key(0)))
    tx = make_optimizer(OptimConfig(learning_rate=1e-5), 100)
    mesh = make_mesh(MeshConfig())
    instruct, pref = pair_batches(cfg, args.pairs)
    inputs = {v: instruct if v == "instruct" else pref for v in VARIANTS}
    runs = {v: build_variant(v, cfg, params, tx, mesh, inputs[v]) for v in VARIANTS}
    for rep in range(args.reps + 1):  # the first round warms up, untimed
        for v in VARIANTS:
            step, state, frozen, stats = runs[v]
            t0 = time.perf_counter()
            state, m = step(state, inputs[v], frozen)
            jax.block_until_ready(m)
            if rep:
                stats["times"].append(time.perf_counter() - t0)
            runs[v] = (step, state, frozen, stats)
    s = {v: runs[v][3] for v in VARIANTS}
    print(f"\n{name}: {args.pairs} pairs (instruct: their {args.pairs} chosen rows) x "
          f"{cfg.context_length} tokens")
    print(f"{'variant':<11} {'GFLOP/step':>11} {'peak MiB':>9} {'temp MiB':>9} {'step s':>7}  s of each round")
    for v in VARIANTS:
        x = s[v]
        print(f"{v:<11} {x['gflop']:>11.1f} {x['peak_mib']:>9.0f} {x['temp_mib']:>9.0f} "
              f"{statistics.median(x['times']):>7.3f}  " + " ".join(f"{t:.3f}" for t in x["times"]))

    def ratio(a: str, b: str) -> float:  # median over rounds of a / b within the round
        return statistics.median(p / q for p, q in zip(s[a]["times"], s[b]["times"]))

    print(f"ratios  step time dpo-live/instruct = {ratio('dpo-live', 'instruct'):.2f}, "
          f"dpo-stored/instruct = {ratio('dpo-stored', 'instruct'):.2f}, "
          f"dpo-stored/dpo-live = {ratio('dpo-stored', 'dpo-live'):.2f}, "
          f"dpo-lora/dpo-live = {ratio('dpo-lora', 'dpo-live'):.2f}")
    print(f"        peak memory dpo-live/instruct = {s['dpo-live']['peak_mib'] / s['instruct']['peak_mib']:.2f}, "
          f"dpo-stored/dpo-live = {s['dpo-stored']['peak_mib'] / s['dpo-live']['peak_mib']:.2f}; "
          f"FLOPs dpo-stored/dpo-live = {s['dpo-stored']['gflop'] / s['dpo-live']['gflop']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model instead of GPT-2 small's shape")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(f"hardware: {hardware()}")
    print("timings on a shared machine are noisy; variants run interleaved, medians reported")
    common = dict(drop_rate=0.0, tie_embeddings=True, dtype="float32")
    if args.quick:
        cfg = GPTConfig(vocab_size=503, emb_dim=64, n_heads=4, n_layers=2,
                        context_length=min(args.context, 32), **common)
        run_variants("tiny", cfg, args)
    else:
        run_variants("gpt2-small", GPTConfig.preset("gpt2-small", context_length=args.context, **common), args)


if __name__ == "__main__":
    main()
