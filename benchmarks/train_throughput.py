"""Training throughput: jaxgpt's compiled train step vs transformers' GPT-2 in PyTorch.

  python benchmarks/train_throughput.py --preset gpt2-small --context 256 --batch 2
  python benchmarks/train_throughput.py --dtype bfloat16           # jax computes in bf16
  python benchmarks/train_throughput.py --breakdown                # where a step's time goes
  python benchmarks/train_throughput.py --profile /tmp/trace       # + a jax.profiler trace
  python benchmarks/train_throughput.py --loss-curve 20            # float32 vs bfloat16 losses
  python benchmarks/train_throughput.py --no-peer --mesh data=8    # jax only, e.g. on a GPU box
  python benchmarks/train_throughput.py --dtype bfloat16 --peer compiled  # torch.compile peer
  python benchmarks/train_throughput.py --compile-cache DIR        # persistent compilation cache

The jax contender is the library's own path: `create_state` + `compile_steps` (one jit with
explicit shardings and the state donated), `lm_loss_fn` and the AdamW of `make_optimizer`
(lr 4e-4, weight decay 0.1 on matrices only). The peer is `transformers`' GPT2LMHeadModel built
from the same config (`jaxgpt.weights.gpt2.hf_config`: same widths, untied head, dropout, GELU
tanh), trained with torch.optim.AdamW (same lr, betas, eps, decay on the same matrices) on the
same batches, with as many torch threads as this process may use. The peer always computes in
float32; with `--dtype bfloat16` a second peer line runs it under torch.autocast(bfloat16).
`--peer compiled` replaces them with the strongest PyTorch recipe (nanoGPT's and llm.c's):
torch.compile of the model, autocast bfloat16, SDPA restricted to the flash kernel on CUDA, fused
AdamW. The peer's vocabulary is jaxgpt's padded one (`--override vocab_multiple=128`).
Contenders are timed step by step in rotating order (a noisy shared machine then slows all of
them alike) and each figure is a median. A step's time includes copying its batch to the
device; compile time is the AOT `lower().compile()` whose executable is then timed.

`--loss-curve N` times nothing: it trains N steps from one initialisation on the same batches
in float32 and in bfloat16 (and the peer, from the same weights via `save_pretrained`) and
prints the curves side by side.

FLOPs per token (nanoGPT's estimate, PaLM appendix B): 6 N + 12 L H Q T, where N counts the
parameters that take part in a matmul -- every parameter except the token and position
embedding tables (lookups, no FLOPs), with the output head counted (once, also when tied) --
L layers, H heads, Q head width, T context. The attention term counts the full T x T scores,
not the causal half. MFU = achieved FLOP/s / peak FLOP/s of all devices used; peak comes from
`--peak-tflops`, else a table of datasheet dense peaks (GPU/TPU), else -- on CPU -- a 2048^3
matmul measured in this run in the compute dtype (the faster of jnp.dot and torch.mm), which
is what this machine actually reaches, not a datasheet figure.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import gzip
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

# JAX would otherwise take 75% of a GPU's memory up front and leave none to the torch peer;
# and without a cap its allocator keeps what it grew to (ctx 1024, batch 16 left torch 0.5 GiB).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if "--no-peer" not in sys.argv:
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import jax
import jax.numpy as jnp
import numpy as np
from hardware import cpu_model  # benchmarks/hardware.py

import jaxgpt
from jaxgpt import kernels
from jaxgpt.config import GPTConfig
from jaxgpt.data.corpus import load_text
from jaxgpt.hostmem import retain_freed_memory
from jaxgpt.models.model import count_params
from jaxgpt.weights.gpt2 import hf_config
from jaxgpt.weights.huggingface import save_pretrained
from jaxgpt.sharding import MeshConfig, batch_sharding, make_mesh
from jaxgpt.data.tokenizer import get_tokenizer
from jaxgpt.training.losses import lm_loss_fn
from jaxgpt.training.optim import make_optimizer, schedule
from jaxgpt.training.runconfig import OptimConfig
from jaxgpt.training.state import create_state
from jaxgpt.training.step import compile_steps

retain_freed_memory()  # before the first JAX computation (jaxgpt/hostmem.py)

# Dense (no sparsity) datasheet peaks in TFLOP/s per device, by a substring of device_kind.
# "float32" is what a float32 matmul runs at under JAX's default precision: TF32 tensor cores
# on Ampere and later GPUs, bf16 passes on TPU.
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


# --- hardware and model arithmetic ---


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


def hardware_lines(torch=None) -> list[str]:
    devs = jax.devices()
    lines = [
        (f"host: {cpu_model()} ({cpu_features()}); {usable_cores()} usable cores "
         f"(os.cpu_count()={os.cpu_count()}); python {platform.python_version()}"),
        (f"jax {jax.__version__}, backend {jax.default_backend()}: {len(devs)} x "
         f"{devs[0].device_kind}  {devs}"),
        f"jaxgpt from {Path(jaxgpt.__file__).parent}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        (f"host malloc: freed memory retained (jaxgpt.hostmem) = {retain_freed_memory()}; one process, "
         f"so the torch peer runs with the same setting"),
    ]
    if torch is not None:
        gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
        lines.append(f"torch {torch.__version__} with {torch.get_num_threads()} threads{gpu}")
    return lines


def matmul_params(params, config: GPTConfig) -> int:
    """Parameters that take part in a matmul: all but the embedding tables, head counted once."""
    n = count_params(params) - config.vocab_size * config.emb_dim - config.context_length * config.emb_dim
    return n + (config.vocab_size * config.emb_dim if config.tie_embeddings else 0)


def flops_per_token(n_matmul: int, config: GPTConfig, t: int) -> float:
    """6 N + 12 L H Q T (forward + backward)."""
    return 6.0 * n_matmul + 12.0 * config.n_layers * config.n_heads * config.head_dim * t


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _best_time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    return min(_timed(fn) for _ in range(repeats))


def jax_matmul_flops(dtype, n: int = 2048, repeats: int = 4) -> float:
    """A square matmul with a float32 result, the form the model's matmuls take (on XLA:CPU a
    bfloat16 dot with a bfloat16 result is upcast to float32 and runs ~5x slower)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(functools.partial(jnp.dot, preferred_element_type=jnp.float32))
    return 2 * n**3 / _best_time(lambda: f(a, a).block_until_ready(), repeats)


def torch_matmul_flops(torch, dtype: str, device: str, n: int = 2048, repeats: int = 4) -> float:
    a = torch.ones((n, n), dtype=getattr(torch, dtype), device=device)

    def run():
        a @ a
        if device == "cuda":
            torch.cuda.synchronize()

    return 2 * n**3 / _best_time(run, repeats)


def peak_flops(args, dtype: str, torch) -> tuple[float, str]:
    """Peak FLOP/s of all jax devices together, and where the number comes from."""
    n_dev = jax.device_count()
    if args.peak_tflops:
        return args.peak_tflops * 1e12 * n_dev, f"--peak-tflops {args.peak_tflops} x {n_dev} device(s)"
    kind = jax.devices()[0].device_kind
    for name, peaks in PEAK_TFLOPS.items():
        if name in kind:
            return peaks[dtype] * 1e12 * n_dev, (
                f"datasheet dense {dtype} peak of {name}: {peaks[dtype]} TFLOP/s x {n_dev}")
    if jax.default_backend() != "cpu":
        measured = jax_matmul_flops(getattr(jnp, dtype), n=8192) * n_dev
        return measured, f"measured jnp.dot 8192^3 {dtype} (device not in the table)"
    found = {"jnp.dot (f32 result)": jax_matmul_flops(getattr(jnp, dtype))}
    if torch is not None:
        found["torch.mm"] = torch_matmul_flops(torch, dtype, "cpu")
    best = max(found, key=found.get)
    detail = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in found.items())
    return found[best], f"CPU estimate: 2048^3 {dtype} matmul measured in this run ({detail}); best used"


# --- data ---


def text_batches(n: int, batch: int, t: int, vocab: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n fixed [B, T] (inputs, targets) pairs of consecutive GPT-2 tokens of CPython's docs."""
    need = n * batch * t + 1
    text = load_text("default")
    ids = np.asarray(get_tokenizer("gpt2").encode(text[: need * 8], disallowed_special=()), np.int32)
    ids = np.resize(ids, need) % vocab  # repeat if short; fold into a tiny test vocabulary
    out = []
    for i in range(n):
        window = ids[i * batch * t: (i + 1) * batch * t + 1]
        out.append((window[:-1].reshape(batch, t), window[1:].reshape(batch, t)))
    return out


# --- contenders ---


class JaxContender:
    """jaxgpt's train step exactly as the trainer builds it."""

    def __init__(self, config: GPTConfig, mesh, batches, seed: int = 0, total_steps: int = 1000,
                 params=None):
        self.name = f"jaxgpt {config.compute_dtype.name}"
        self.config, self.mesh, self.batches = config, mesh, batches
        optim = OptimConfig()  # lr 4e-4 constant, weight decay 0.1, betas (0.9, 0.999)
        self.tx = make_optimizer(optim, total_steps)
        self.loss_fn = lm_loss_fn(config)
        t0 = time.perf_counter()
        self.state, self.state_sh = create_state(config, self.tx, mesh, seed, params=params)
        jax.block_until_ready(self.state)
        self.init_s = time.perf_counter() - t0
        self.batch_sh = batch_sharding(mesh, 3)
        train, _ = compile_steps(self.loss_fn, self.tx, schedule(optim, total_steps),
                                 self.state_sh, mesh)
        t0 = time.perf_counter()
        lowered = train.lower(self.state, self.put(0), None)
        self.lower_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.step_fn = lowered.compile()
        self.compile_s = time.perf_counter() - t0
        self.losses: list[float] = []

    def put(self, i: int) -> dict:
        x, y = self.batches[i % len(self.batches)]
        return jax.device_put({"inputs": x[None], "targets": y[None]}, self.batch_sh)  # [1, B, T]

    def step(self, i: int) -> float:
        """One optimizer step including the host-to-device copy of its batch; seconds."""
        t0 = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, self.put(i), None)
        loss = float(metrics["loss"])  # waits for the step
        jax.block_until_ready(self.state)
        dt = time.perf_counter() - t0
        self.losses.append(loss)
        return dt


def _causal_sdpa() -> str:
    """transformers' SDPA attention with no mask built: SDPA then gets is_causal=True, which its
    flash kernel takes; under torch.compile with torch < 2.14, transformers builds an explicit
    causal mask, which the flash kernel refuses. Exact here: training batches have no padding."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("sdpa_causal", sdpa_attention_forward)
    AttentionMaskInterface.register("sdpa_causal", lambda *args, **kwargs: None)
    return "sdpa_causal"


class TorchContender:
    """transformers' GPT2LMHeadModel with the same shapes, trained by torch AdamW."""

    def __init__(self, torch, config: GPTConfig, batches, autocast: bool = False,
                 weights_dir: str | None = None, seed: int = 0, compiled: bool = False):
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.torch, self.batches, self.autocast = torch, batches, autocast
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.name = ("torch.compile" if compiled else "torch float32") + (
            " + autocast bf16" if autocast else "")
        torch.manual_seed(seed)
        if weights_dir is not None:
            model = GPT2LMHeadModel.from_pretrained(weights_dir, attn_implementation="sdpa")
        else:
            hf = {**hf_config(config), "vocab_size": config.padded_vocab_size}
            model = GPT2LMHeadModel._from_config(
                GPT2Config(**hf), attn_implementation=_causal_sdpa() if compiled else "sdpa")
        self.model = model.to(self.device).train()
        self.forward = torch.compile(self.model) if compiled else self.model
        self.sdpa = contextlib.nullcontext
        if compiled and self.device == "cuda":  # flash attention or an error, never the math path
            from torch.nn.attention import SDPBackend, sdpa_kernel
            self.sdpa = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)
        # Decay matrices and embeddings, not biases or LayerNorms: jaxgpt's decay_mask.
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        opt = OptimConfig()
        # fused=True is torch's fastest AdamW on both CPU and CUDA.
        self.opt = torch.optim.AdamW(groups, lr=opt.learning_rate, betas=(opt.b1, opt.b2),
                                     eps=opt.eps, fused=True)
        self.n_params = sum(p.numel() for p in params)
        self.attention = self.model.config._attn_implementation
        self.losses: list[float] = []
        self.phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def step(self, i: int) -> float:
        torch = self.torch
        x, y = self.batches[i % len(self.batches)]
        t0 = time.perf_counter()
        inputs = torch.from_numpy(x).long().to(self.device)
        targets = torch.from_numpy(y).long().to(self.device)
        ctx = (torch.autocast(self.device, dtype=torch.bfloat16) if self.autocast
               else contextlib.nullcontext())
        with ctx, self.sdpa():
            logits = self.forward(inputs, use_cache=False).logits  # [B, T, V]
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        self._sync()
        t1 = time.perf_counter()
        with self.sdpa():
            loss.backward()
        self._sync()
        t2 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._sync()
        t3 = time.perf_counter()
        self.losses.append(loss.item())
        for k, dt in zip(self.phases, (t1 - t0, t2 - t1, t3 - t2)):
            self.phases[k].append(dt)
        return t3 - t0


def interleaved(contenders, steps: int, warmup: int) -> dict[str, list[float]]:
    """Warm each up, then time one step of each per round, rotating who goes first."""
    for c in contenders:
        for i in range(warmup):
            c.step(i)
    times = {c.name: [] for c in contenders}
    for r in range(steps):
        k = r % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            times[c.name].append(c.step(warmup + r))
    return times


# --- sections ---


def attention_path(config: GPTConfig, args) -> str:
    """Which attention the jax step runs at this shape (kernels/backend_attention.py)."""
    if config.kernels == "reference":
        return "reference"
    from jaxgpt.kernels.backend_attention import choose_attention

    shape = (args.batch, args.context, config.n_heads, config.head_dim)
    name, reason = choose_attention(kernels.backend(), config.compute_dtype, shape, shape, False,
                                    config.attention_drop_rate > 0)
    return name + (f" ({reason})" if reason else "")


def make_config(args, dtype: str) -> GPTConfig:
    overrides = dict(context_length=args.context, dtype=dtype, drop_rate=args.drop_rate,
                     kernels=args.kernels, remat_policy=args.remat,
                     scan_layers=args.scan_layers, qkv_bias=True, tie_embeddings=args.tie)
    defaults = GPTConfig()
    for item in args.override:
        key, _, value = item.partition("=")
        if not hasattr(defaults, key) or not value:
            raise SystemExit(f"--override {item!r}: expected FIELD=VALUE with a GPTConfig field")
        kind = float if getattr(defaults, key) is None else type(getattr(defaults, key))  # attn_drop_rate
        overrides[key] = value == "True" if kind is bool else kind(value)
    return GPTConfig.preset(args.preset, **overrides)


def parse_mesh(text: str | None) -> MeshConfig:
    if not text:
        return MeshConfig()
    values = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in ("data", "fsdp", "tensor") or not value.lstrip("-").isdigit():
            raise SystemExit(f"--mesh: expected data=N,fsdp=N,tensor=N, got {part!r}")
        values[key] = int(value)
    return MeshConfig(**values)


def _ms(s: float) -> str:
    return f"{s * 1e3:9.1f} ms"


def _spread(ts: list[float]) -> str:
    return (f"median {statistics.median(ts) * 1e3:8.1f} ms (min {min(ts) * 1e3:.1f}, "
            f"max {max(ts) * 1e3:.1f}, n={len(ts)})")


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
    jx.flops_per_token = fpt
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
    times = interleaved(contenders, args.steps, args.warmup)

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

    if args.breakdown or args.profile:
        breakdown(jx, args)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            for i in range(3):
                with jax.profiler.StepTraceAnnotation("train", step_num=i):
                    jx.step(i)
        print(f"\nprofile: 3 train steps traced to {args.profile} (an .xplane.pb for TensorBoard/XProf "
              f"and a perfetto_trace.json.gz for ui.perfetto.dev)")
        summarize_trace(args.profile, jx.step_fn.as_text(), 3)


def breakdown(jx: JaxContender, args) -> None:
    """Time separately jitted pieces of the step, interleaved with the step itself."""
    import optax

    from jaxgpt.models.model import GPT
    from jaxgpt.sharding import traced_under

    state, loss_fn, tx, cfg = jx.state, jx.loss_fn, jx.tx, jx.config
    mb_sh = batch_sharding(jx.mesh, 2, 0)
    params_sh = jx.state_sh.params
    key = jax.random.key(1)
    x, y = jx.batches[0]
    mb = jax.device_put({"inputs": x, "targets": y}, mb_sh)  # [B, T]
    # The trunk: everything but the head and the loss (a fixed random projection of ln_f's
    # output stands in for them), to show what the [D, V] head matmul and softmax cost.
    proj = jax.random.normal(jax.random.key(2), (*x.shape, cfg.emb_dim))  # [B, T, D]

    def trunk_loss(p, b):
        hidden = GPT(cfg).apply({"params": p}, b["inputs"], False, return_hidden=True,
                                rngs={"dropout": key})  # [B, T, D]
        return jnp.sum(hidden * proj)

    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def under(f):
        return traced_under(f, jx.mesh)

    def loss(p, b):
        return loss_fn(p, None, b, key, False)[0]

    jits = {
        "forward (loss)": jax.jit(under(loss), in_shardings=(params_sh, mb_sh)),
        "forward + backward": jax.jit(under(jax.value_and_grad(loss)), in_shardings=(params_sh, mb_sh)),
        "  trunk only (no head/loss)": jax.jit(under(jax.value_and_grad(trunk_loss)),
                                               in_shardings=(params_sh, mb_sh)),
    }
    compiled, compile_s = {}, {}
    for name, f in jits.items():
        t0 = time.perf_counter()
        compiled[name] = f.lower(state.params, mb).compile()
        compile_s[name] = time.perf_counter() - t0
    _, grads = compiled["forward + backward"](state.params, mb)
    opt_jit = jax.jit(update, in_shardings=(params_sh, jx.state_sh.opt_state, params_sh),
                      out_shardings=(params_sh, jx.state_sh.opt_state), donate_argnums=(1, 2))
    held = {"params": jax.tree.map(jnp.copy, state.params),
            "opt": jax.tree.map(jnp.copy, state.opt_state)}
    t0 = time.perf_counter()
    opt_c = opt_jit.lower(grads, held["opt"], held["params"]).compile()
    compile_s["optimizer (AdamW update)"] = time.perf_counter() - t0

    def run_opt():
        held["params"], held["opt"] = jax.block_until_ready(opt_c(grads, held["opt"], held["params"]))

    pieces = {"full train step": None}
    pieces.update({k: (lambda c=c: jax.block_until_ready(c(state.params, mb)))
                   for k, c in compiled.items()})
    pieces["optimizer (AdamW update)"] = run_opt
    pieces["host-to-device batch"] = lambda: jax.block_until_ready(
        jax.device_put({"inputs": x[None], "targets": y[None]}, jx.batch_sh))
    names = list(pieces)
    times = {n: [] for n in names}
    for n in names[1:]:
        pieces[n]()  # warm up
    for r in range(args.steps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            if n == "full train step":
                times[n].append(jx.step(r))
                state = jx.state  # the step donated the old state
            else:
                times[n].append(_timed(pieces[n]))
    med = {n: statistics.median(v) for n, v in times.items()}

    print(f"\njax breakdown: separately jitted pieces timed in turn with the full step, medians of "
          f"{args.steps} (compile time in brackets)")
    print(f"  {'compile train step':32s} {jx.compile_s:8.1f} s  (+ trace/lower {jx.lower_s:.1f} s)")
    for n in names:
        extra = f"  [{compile_s[n]:.1f} s]" if n in compile_s else ""
        print(f"  {n:32s} {_ms(med[n])}{extra}")
    f, fb, tr = med["forward (loss)"], med["forward + backward"], med["  trunk only (no head/loss)"]
    o, h, step = med["optimizer (AdamW update)"], med["host-to-device batch"], med["full train step"]
    head_share = 6 * cfg.emb_dim * cfg.vocab_size / jx.flops_per_token
    print(f"  => backward ~ (fwd+bwd) - fwd    {_ms(fb - f)}")
    print(f"  => head + loss ~ (fwd+bwd) - trunk {_ms(fb - tr)}  ({(fb - tr) / fb:.0%} of fwd+bwd time; "
          f"{head_share:.0%} of the FLOPs)")
    print(f"  => step - (fwd+bwd + opt + copy) {_ms(step - fb - o - h)}  (gradient scan, norm, "
          f"non-finite guard, fusion across the pieces)")


def _hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (category, source op name) for the ops of a compiled HLO module."""
    ops = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z\-]+)\(", line)
        if not m:
            continue
        name, opcode = m.groups()
        src = re.search(r'op_name="([^"]*)"', line)
        src = src.group(1) if src else ""
        if "__ynn_fusion" in line or "__onednn" in line or "__xnn" in line or "cublas" in line \
                or opcode in ("dot", "convolution") or "gemm" in name:
            cat = "matmul"
        elif opcode == "while":
            cat = "while loops (RNG on CPU)"
        elif "scatter" in name or "gather" in name or opcode in ("scatter", "gather"):
            cat = "gather/scatter (embedding)"
        else:
            cat = "elementwise/reduce/copy"
        ops[name] = (cat, src)
    return ops


def summarize_trace(directory: str, hlo_text: str, steps: int, top: int = 8) -> None:
    """Where the traced steps' XLA ops spent their time, by category and by op."""
    files = sorted(Path(directory).glob("plugins/profile/*/perfetto_trace.json.gz"))
    if not files:
        print("  (no perfetto trace found)")
        return
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    ops = _hlo_ops(hlo_text)
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in ops:
            total[e["name"]] += e.get("dur", 0) / 1e6 / steps
            count[e["name"]] += 1
    if not total:
        print("  (the trace has no per-op events on this backend)")
        return
    by_cat = collections.Counter()
    for name, t in total.items():
        by_cat[ops[name][0]] += t
    whole = sum(by_cat.values())
    print(f"  op time per step from the trace (summed over threads, so it may exceed the wall time): "
          f"{whole * 1e3:.0f} ms")
    for cat, t in by_cat.most_common():
        print(f"    {cat:30s} {t * 1e3:9.1f} ms  {t / whole:6.1%}")
    print(f"  top {top} ops:")
    for name, t in total.most_common(top):
        print(f"    {t * 1e3:9.1f} ms  {name:28s} {ops[name][1][-70:]}")


def loss_curve(args, torch) -> None:
    """N steps from one initialisation on the same batches, in float32 and in bfloat16."""
    n = args.loss_curve
    mesh = make_mesh(parse_mesh(args.mesh))
    f32, bf16 = make_config(args, "float32"), make_config(args, "bfloat16")
    batches = text_batches(n, args.batch, args.context, f32.vocab_size)
    curves, names = [], []
    init = None
    for config in (f32, bf16):
        jx = JaxContender(config, mesh, batches, total_steps=n, params=init)
        if init is None:
            init = jax.device_get(jx.state.params)  # the same start for every run
        for i in range(n):
            jx.step(i)
        curves.append(jx.losses)
        names.append(jx.name)
        del jx
    if torch is not None:
        with tempfile.TemporaryDirectory(prefix="jaxgpt_bench_") as weights:
            save_pretrained(f32, init, weights)
            peer = TorchContender(torch, f32, batches, weights_dir=weights)
        for i in range(n):
            peer.step(i)
        curves.append(peer.losses)
        names.append(peer.name)
    print(f"\nloss curves: {n} steps, batch {args.batch} x {args.context}, same initial weights and "
          f"batches, AdamW lr 4e-4; dropout {args.drop_rate}"
          + (" (the jax runs share dropout masks; torch draws its own)" if args.drop_rate else ""))
    print(f"{'step':>5s} " + " ".join(f"{n_:>16s}" for n_ in names) + f" {'bf16 - f32':>11s}")
    for i in range(n):
        print(f"{i + 1:5d} " + " ".join(f"{c[i]:16.4f}" for c in curves)
              + f" {curves[1][i] - curves[0][i]:+11.4f}")
    diff = np.abs(np.asarray(curves[1]) - np.asarray(curves[0]))
    print(f"|bf16 - f32|: mean {diff.mean():.4f}, max {diff.max():.4f}; "
          f"f32 {curves[0][0]:.3f} -> {curves[0][-1]:.3f}, bf16 {curves[1][0]:.3f} -> {curves[1][-1]:.3f}")
    if torch is not None:
        d = np.abs(np.asarray(curves[2]) - np.asarray(curves[0]))
        print(f"|torch f32 - jax f32|: mean {d.mean():.4f}, max {d.max():.4f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="jax compute dtype (params stay float32); the peer runs float32")
    p.add_argument("--steps", type=int, default=8, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps per contender (on CPU the second step still maps fresh "
                        "host memory after the peer's first allocations)")
    p.add_argument("--mesh", default=None, help="e.g. data=1,fsdp=1,tensor=1 (default: data=all)")
    p.add_argument("--drop-rate", type=float, default=GPTConfig.drop_rate)
    p.add_argument("--kernels", choices=kernels.KERNEL_SETS, default="auto")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots", "dots_no_batch"))
    p.add_argument("--scan-layers", action="store_true")
    p.add_argument("--tie", action="store_true", help="tie the head to the token embedding")
    p.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other GPTConfig field, e.g. n_layers=2 (repeatable)")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU")
    p.add_argument("--no-peer", action="store_true", help="skip the PyTorch peer")
    p.add_argument("--peer", choices=("eager", "compiled"), default="eager",
                   help="eager: torch float32 (+ autocast bf16); compiled: torch.compile + "
                        "autocast bf16 + SDPA flash + fused AdamW")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="jaxgpt's persistent compilation cache in DIR (as train/*.py enable it)")
    p.add_argument("--breakdown", action="store_true", help="time forward, backward, optimizer, copy")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also write a jax.profiler trace of 3 train steps to DIR and summarise it "
                        "(implies --breakdown)")
    p.add_argument("--loss-curve", type=int, default=0, metavar="N",
                   help="instead of timing, train N steps in float32 and bfloat16 and print both")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch = None
    if not args.no_peer:
        import torch

        torch.set_num_threads(usable_cores())
    if args.compile_cache:
        os.environ["JAXGPT_CACHE_DIR"] = args.compile_cache
        from jaxgpt.entrypoint import enable_compile_cache

        print(f"compilation cache: {enable_compile_cache()}")
    print("\n".join(hardware_lines(torch)))
    t0 = time.perf_counter()
    if args.loss_curve:
        loss_curve(args, torch)
    else:
        throughput(args, torch)
    print(f"\nwall time of this invocation: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
