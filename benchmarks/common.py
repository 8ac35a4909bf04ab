"""What the benchmarks share: the machine a figure came from, timing contenders side by side, and
the arithmetic of a model's work (FLOPs per token, datasheet peaks, a decode step's matmul floor).

Every script prints `hardware()` (or `hardware_lines()`) beside its figures, and times its
contenders in turns (`interleaved_best`, `interleaved_steps`) so that load from other processes
slows all of them alike.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

# Dense (no sparsity) datasheet peaks in TFLOP/s per device, by a substring of device_kind
# (first match wins). "float32" is what a float32 matmul runs at under JAX's default precision:
# TF32 tensor cores on Ampere and later GPUs, bf16 passes on TPU.
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.0, "float32": 494.5},
    "H100 PCIe": {"bfloat16": 756.0, "float32": 378.0},
    "H100": {"bfloat16": 989.0, "float32": 494.5},  # SXM
    "A100": {"bfloat16": 312.0, "float32": 156.0},
    "L4": {"bfloat16": 121.0, "float32": 60.0},
    "A10G": {"bfloat16": 70.0, "float32": 35.0},
    "TPU v6": {"bfloat16": 918.0, "float32": 918.0},
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v5": {"bfloat16": 197.0, "float32": 197.0},  # v5e / v5 lite
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
}

# Datasheet HBM bandwidth in bytes/s, by a substring of device_kind (first match wins).
HBM_BYTES_PER_S = {
    "H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "GH200": 4.0e12, "B200": 8.0e12,
    "A100-SXM4-80GB": 2.039e12, "A100": 1.555e12, "L40S": 0.864e12, "L4": 0.3e12, "A10G": 0.6e12,
}

# CPU features worth naming beside a CPU figure: what XLA:CPU and oneDNN use for matmuls.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


# --- the machine ---


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_features() -> str:
    """Which of CPU_FEATURES this CPU has, as one string."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in CPU_FEATURES if f in flags) or "none of avx2/avx512/amx"


def hardware(device: bool = True) -> str:
    """One line: the CPU, its features, usable cores and load average, and (with `device`, which
    starts JAX) the devices."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    line = (f"{cpu_model()} ({cpu_features()}); {usable_cores()} usable cores "
            f"(load average {load:.1f})")
    if device:
        import jax

        devs = jax.devices()
        line += f"; jax {jax.__version__} on {len(devs)} x {devs[0].device_kind}"
    return line


def hardware_lines(torch=None) -> list[str]:
    """The long form, for the training benchmarks: host, JAX devices, where jaxgpt came from, the
    host allocator setting, and the torch peer's threads and GPU."""
    import jax

    import jaxgpt
    from jaxgpt.hostmem import retain_freed_memory

    devs = jax.devices()
    lines = [
        (f"host: {cpu_model()} ({cpu_features()}); {usable_cores()} usable cores "
         f"(os.cpu_count()={os.cpu_count()}); python {platform.python_version()}"),
        (f"jax {jax.__version__}, backend {jax.default_backend()}: {len(devs)} x "
         f"{devs[0].device_kind}  {devs}"),
        f"jaxgpt from {Path(jaxgpt.__file__).parent}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        (f"host malloc: freed memory retained (jaxgpt.hostmem) = {retain_freed_memory()}; one "
         f"process, so a torch peer runs with the same setting"),
    ]
    if torch is not None:
        gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
        lines.append(f"torch {torch.__version__} with {torch.get_num_threads()} threads{gpu}")
    return lines


def lookup(table: dict, device_kind: str):
    """The entry of a by-device-name table (PEAK_TFLOPS, HBM_BYTES_PER_S) for device_kind, or None."""
    return next((v for name, v in table.items() if name in device_kind), None)


# --- timing ---


def compiled_stats(compiled) -> dict:
    """XLA's figures for a compiled executable: GFLOP (cost_analysis) and MiB of peak memory
    (arguments + outputs - aliased + temporaries) and of temporaries (memory_analysis)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    return {"gflop": cost.get("flops", float("nan")) / 1e9, "peak_mib": peak / 2**20,
            "temp_mib": mem.temp_size_in_bytes / 2**20}


def timed(fn) -> float:
    """Seconds one call of fn takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_time(fn, repeats: int) -> float:
    """Best of `repeats` calls, after one untimed call (compile, warm up)."""
    fn()
    return min(timed(fn) for _ in range(repeats))


def interleaved_best(contenders: dict, repeats: int) -> dict:
    """name -> best seconds of each zero-argument contender over `repeats` rounds, taking turns
    (after one untimed warm-up call each)."""
    for fn in contenders.values():
        fn()
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(repeats):
        for name, fn in contenders.items():
            best[name] = min(best[name], timed(fn))
    return best


def interleaved_steps(contenders, steps: int, warmup: int) -> dict[str, list[float]]:
    """name -> seconds of each timed step, for contenders with `.name` and `.step(i) -> seconds`:
    `warmup` untimed steps each, then one step of each per round, rotating who goes first."""
    for c in contenders:
        for i in range(warmup):
            c.step(i)
    times = {c.name: [] for c in contenders}
    for r in range(steps):
        k = r % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            times[c.name].append(c.step(warmup + r))
    return times


# --- the model's work ---


def matmul_params(params, config) -> int:
    """Parameters that take part in a matmul: all but the embedding tables, head counted once."""
    from jaxgpt.models.model import count_params

    n = count_params(params) - config.vocab_size * config.emb_dim
    if config.family == "gpt2":
        n -= config.context_length * config.emb_dim  # the position table: a lookup too
    return n + (config.vocab_size * config.emb_dim if config.tie_embeddings else 0)


def flops_per_token(n_matmul: int, config, t: int) -> float:
    """Training FLOPs per token, forward and backward: 6 N + 12 L H K T (nanoGPT's estimate,
    PaLM appendix B; the attention term counts the full T x T scores)."""
    return 6.0 * n_matmul + 12.0 * config.n_layers * config.n_heads * config.head_dim * t


def matmul_floor(config, rows: int, steps: int = 1):
    """A zero-argument function running `steps` decode steps' worth of matmuls alone for `rows`
    sequences, in one jitted loop: per layer the attention projections and the MLP's products
    with the model's shapes, then the head; the model's dependencies, nothing else (random
    weights). No decoder built from XLA's dots beats it: it separates what the compiler's
    matmuls cost from what a decoder adds (attention over the cache, norms, sampling, the loop)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    D, F, V = config.emb_dim, config.mlp_width, config.vocab_size
    qkv, out = (config.n_heads + 2 * config.kv_heads) * config.head_dim, config.n_heads * config.head_dim
    key = jax.random.key(1)
    shapes = [(D, qkv), (out, D), (D, F), (F, D)] * config.n_layers + [(D, V)]
    ws = [jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32) * 0.02
          for i, s in enumerate(shapes)]

    @jax.jit
    def run(x, ws):
        def step(_, x):  # x [B, D]
            for i in range(0, len(ws) - 1, 4):
                a = x @ ws[i]  # [B, (H + 2 Hkv) K]
                x = x + a[:, :out] @ ws[i + 1] * 1e-3
                x = x + jnp.tanh(x @ ws[i + 2]) @ ws[i + 3] * 1e-3
            logits = x @ ws[-1]  # [B, V]
            return x * 0.5 + logits[:, :D] * 1e-3
        return lax.fori_loop(0, steps, step, x)

    x = jnp.ones((rows, D), jnp.float32)
    return lambda: run(x, ws).block_until_ready()
