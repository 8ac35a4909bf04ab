"""Where a jaxgpt train step's time goes: separately jitted pieces (forward, forward + backward,
the trunk without the head, the AdamW update, the batch copy) timed in turns with the full step;
with --profile, a jax.profiler trace of three steps summarised by op category.

  python benchmarks/train_breakdown.py --preset gpt2-small --context 256 --batch 2
  python benchmarks/train_breakdown.py --profile /tmp/trace      # + the trace and its summary
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import time
from pathlib import Path

from train_peers import JaxContender, add_run_args, make_config, parse_mesh, start, text_batches  # noqa: I001

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from common import flops_per_token, matmul_params, timed  # noqa: E402  (benchmarks/common.py)

from jaxgpt.models.model import GPT  # noqa: E402
from jaxgpt.sharding import batch_sharding, make_mesh, traced_under  # noqa: E402


def _ms(s: float) -> str:
    return f"{s * 1e3:9.1f} ms"


def breakdown(jx: JaxContender, args) -> None:
    """Time separately jitted pieces of the step, interleaved with the step itself."""
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
                times[n].append(timed(pieces[n]))
    med = {n: statistics.median(v) for n, v in times.items()}

    print(f"\njax breakdown: separately jitted pieces timed in turn with the full step, medians of "
          f"{args.steps} (compile time in brackets)")
    print(f"  {'compile train step':32s} {jx.compile_s:8.1f} s  (+ trace/lower {jx.lower_s:.1f} s)")
    for n in names:
        extra = f"  [{compile_s[n]:.1f} s]" if n in compile_s else ""
        print(f"  {n:32s} {_ms(med[n])}{extra}")
    f, fb, tr = med["forward (loss)"], med["forward + backward"], med["  trunk only (no head/loss)"]
    o, h, step = med["optimizer (AdamW update)"], med["host-to-device batch"], med["full train step"]
    head_share = 6 * cfg.emb_dim * cfg.vocab_size / flops_per_token(
        matmul_params(state.params, cfg), cfg, args.context)
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


def profile(jx: JaxContender, directory: str) -> None:
    """Trace three train steps to `directory` and print where their ops spent the time."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        for i in range(3):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                jx.step(i)
    print(f"\nprofile: 3 train steps traced to {directory} (an .xplane.pb for TensorBoard/XProf "
          f"and a perfetto_trace.json.gz for ui.perfetto.dev)")
    summarize_trace(directory, jx.step_fn.as_text(), 3)


def main(argv=None) -> None:
    p = add_run_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--steps", type=int, default=8, help="timed rounds")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also write a jax.profiler trace of 3 train steps to DIR and summarise it")
    args = p.parse_args(argv)
    args.no_peer = True  # jax alone
    start(args)
    config = make_config(args, args.dtype)
    mesh = make_mesh(parse_mesh(args.mesh))
    jx = JaxContender(config, mesh, text_batches(args.steps + 3, args.batch, args.context,
                                                 config.vocab_size))
    jx.step(0)  # warm up
    breakdown(jx, args)
    if args.profile:
        profile(jx, args.profile)


if __name__ == "__main__":
    main()
