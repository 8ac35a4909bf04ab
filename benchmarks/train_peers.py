"""The two training contenders the train_*.py benchmarks run side by side, and their shared flags.

The jax contender is the library's own path: `create_state` + `compile_steps` (one jit with
explicit shardings and the state donated), `lm_loss_fn` and the AdamW of `make_optimizer`
(lr 4e-4, weight decay 0.1 on matrices only). The peer is `transformers`' GPT2LMHeadModel built
from the same config (`jaxgpt.weights.gpt2.hf_config`: same widths, untied head, dropout, GELU
tanh), trained with torch.optim.AdamW (same lr, betas, eps, decay on the same matrices) on the
same batches, with as many torch threads as this process may use. `compiled=True` makes it the
strongest PyTorch recipe (nanoGPT's and llm.c's): torch.compile of the model, autocast bfloat16,
SDPA restricted to the flash kernel on CUDA, fused AdamW. The peer's vocabulary is jaxgpt's
padded one (`--override vocab_multiple=128`). A step's time includes copying its batch to the
device; compile time is the AOT `lower().compile()` whose executable is then timed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

# JAX would otherwise take 75% of a GPU's memory up front and leave none to the torch peer;
# and without a cap its allocator keeps what it grew to (ctx 1024, batch 16 left torch 0.5 GiB).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if "--no-peer" not in sys.argv:
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import hardware_lines, usable_cores  # noqa: E402  (benchmarks/common.py)

from jaxgpt import kernels  # noqa: E402
from jaxgpt.config import GPTConfig  # noqa: E402
from jaxgpt.data.corpus import load_text  # noqa: E402
from jaxgpt.data.tokenizer import get_tokenizer  # noqa: E402
from jaxgpt.hostmem import retain_freed_memory  # noqa: E402
from jaxgpt.sharding import MeshConfig, batch_sharding  # noqa: E402
from jaxgpt.training.losses import lm_loss_fn  # noqa: E402
from jaxgpt.training.optim import make_optimizer, schedule  # noqa: E402
from jaxgpt.training.runconfig import OptimConfig  # noqa: E402
from jaxgpt.training.state import create_state  # noqa: E402
from jaxgpt.training.step import compile_steps  # noqa: E402
from jaxgpt.weights.gpt2 import hf_config  # noqa: E402

retain_freed_memory()  # before the first JAX computation (jaxgpt/hostmem.py)


def add_run_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The model, batch and mesh flags every train_*.py benchmark takes."""
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--mesh", default=None, help="e.g. data=1,fsdp=1,tensor=1 (default: data=all)")
    p.add_argument("--drop-rate", type=float, default=GPTConfig.drop_rate)
    p.add_argument("--kernels", choices=kernels.KERNEL_SETS, default="auto")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots", "dots_no_batch"))
    p.add_argument("--scan-layers", action="store_true")
    p.add_argument("--tie", action="store_true", help="tie the head to the token embedding")
    p.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other GPTConfig field, e.g. n_layers=2 (repeatable)")
    p.add_argument("--no-peer", action="store_true", help="skip the PyTorch peer")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="jaxgpt's persistent compilation cache in DIR (as train/*.py enable it)")
    return p


def start(args):
    """Torch (or None with --no-peer) with this process's cores, the compile cache if asked for,
    and the hardware lines printed."""
    torch = None
    if not args.no_peer:
        import torch

        torch.set_num_threads(usable_cores())
    if args.compile_cache:
        os.environ["JAXGPT_CACHE_DIR"] = args.compile_cache
        from jaxgpt.entrypoint import enable_compile_cache

        print(f"compilation cache: {enable_compile_cache()}")
    print("\n".join(hardware_lines(torch)))
    return torch


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


def causal_sdpa() -> str:
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
                GPT2Config(**hf), attn_implementation=causal_sdpa() if compiled else "sdpa")
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
