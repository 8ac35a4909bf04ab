"""bfloat16 against float32 training: N steps of jaxgpt from one initialisation on the same
batches in float32 and in bfloat16, and transformers' GPT-2 in float32 from the same weights
(via `save_pretrained`), the loss curves side by side. Times nothing.

  python benchmarks/train_loss_curve.py --steps 20
  python benchmarks/train_loss_curve.py --steps 20 --no-peer --drop-rate 0
"""

from __future__ import annotations

import argparse
import tempfile

from train_peers import (  # noqa: I001
    JaxContender, TorchContender, add_run_args, make_config, parse_mesh, start, text_batches)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxgpt.sharding import make_mesh  # noqa: E402
from jaxgpt.weights.huggingface import save_pretrained  # noqa: E402


def loss_curve(args, torch) -> None:
    """N steps from one initialisation on the same batches, in float32 and in bfloat16."""
    n = args.steps
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


def main(argv=None) -> None:
    p = add_run_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--steps", type=int, default=20, help="training steps per curve")
    args = p.parse_args(argv)
    loss_curve(args, start(args))


if __name__ == "__main__":
    main()
