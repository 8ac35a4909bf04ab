"""Replay a run's first batches in jaxgpt and in transformers/PyTorch from the same weights.

  python benchmarks/replay.py --config configs/ch05_verdict.yaml --steps 26

A parity check of the whole training step on real batches, not a timing: the batches are the
ones `train/pretrain.py --config ...` would draw (same seed, same order), the initial weights are
the run's own initialisation exported with `save_pretrained`, and both sides train with the
benchmark's AdamW (lr 4e-4, betas (0.9, 0.999), weight decay 0.1 on matrices and embeddings,
no clipping). Dropout is off on both sides unless --drop-rate is given (then each side draws its
own masks and the curves only agree in trend). Prints the two loss curves side by side.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_peers import JaxContender, TorchContender  # noqa: E402, I001  (sets JAX's memory options)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import usable_cores  # noqa: E402  (benchmarks/common.py)

from jaxgpt.data.windows import batch_indices  # noqa: E402
from jaxgpt.hostmem import retain_freed_memory  # noqa: E402
from jaxgpt.models.model import init_params  # noqa: E402
from jaxgpt.sharding import MeshConfig, make_mesh  # noqa: E402
from jaxgpt.weights.huggingface import save_pretrained  # noqa: E402
from jaxgpt.tasks.pretraining import window_datasets  # noqa: E402
from jaxgpt.training.runconfig import load_config  # noqa: E402

retain_freed_memory()  # before the first JAX computation (jaxgpt/hostmem.py)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/ch05_verdict.yaml")
    p.add_argument("--steps", type=int, default=26)
    p.add_argument("--drop-rate", type=float, default=0.0)
    args = p.parse_args(argv)
    cfg = load_config(args.config, [f"model.drop_rate={args.drop_rate}"])
    train, _ = window_datasets(cfg)
    batches = []
    for step in range(args.steps):
        idx = batch_indices(len(train), batch_size=cfg.train.batch_size, step=step,
                            seed=cfg.train.seed)
        rows = train.rows(idx)
        batches.append((rows["inputs"], rows["targets"]))
    init = jax.device_get(init_params(cfg.model, jax.random.key(cfg.train.seed)))

    ours = JaxContender(cfg.model, make_mesh(MeshConfig()), batches,
                        total_steps=args.steps, params=init)
    import torch

    torch.set_num_threads(usable_cores())
    with tempfile.TemporaryDirectory(prefix="jaxgpt_replay_") as weights:
        save_pretrained(cfg.model, init, weights)
        peer = TorchContender(torch, cfg.model, batches, weights_dir=weights)
    for i in range(args.steps):
        ours.step(i)
        peer.step(i)
    print(f"{args.config}: first {args.steps} batches, same initial weights, dropout "
          f"{args.drop_rate}, batch {cfg.train.batch_size} x {cfg.model.context_length}")
    print(f"{'step':>4s} {'jaxgpt':>9s} {'torch':>9s} {'diff':>8s}")
    for i, (a, b) in enumerate(zip(ours.losses, peer.losses)):
        print(f"{i + 1:4d} {a:9.4f} {b:9.4f} {a - b:+8.4f}")
    d = np.abs(np.asarray(ours.losses) - np.asarray(peer.losses))
    print(f"|jaxgpt - torch|: mean {d.mean():.4f}, max {d.max():.4f}")


if __name__ == "__main__":
    main()
