"""LoRA finetuning through `trainer.fit` on a tiny model, run in its own process when sharded.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/e2e/workers/lora_fit.py OUT_DIR RUNS_DIR --fsdp 8

writes OUT_DIR/trainable.npz (the trained adapters and full leaves, by path) and OUT_DIR/specs.json
(the PartitionSpec of a few adapters and of their Adam moments).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxgpt.lora import transform as lora  # noqa: E402
from jaxgpt.config import GPTConfig  # noqa: E402
from jaxgpt.data.windows import WindowDataset  # noqa: E402
from jaxgpt.models.model import init_params  # noqa: E402
from jaxgpt.training.losses import lm_loss_fn  # noqa: E402
from jaxgpt.training.runconfig import MeshConfig, OptimConfig, RunConfig, TrainConfig  # noqa: E402
from jaxgpt.training.fit import fit  # noqa: E402
from jaxgpt.training.trainer import Trainable  # noqa: E402

# emb_dim 24 so that the "embed" axis splits over 8 fsdp devices; other sizes stay odd/distinct.
MODEL = GPTConfig(vocab_size=67, context_length=11, emb_dim=24, n_heads=3, n_layers=2,
                  drop_rate=0.0, qkv_bias=True)
LORA = lora.LoRAConfig(rank=3, alpha=6.0, trainable=("ln_f",))
SPEC_PATHS = ("lora/h_0/attn/query/kernel/a", "lora/h_0/attn/query/kernel/b",
              "lora/h_1/mlp/c_proj/kernel/b", "full/ln_f/scale")


def datasets():
    ids = np.random.default_rng(0).integers(0, MODEL.vocab_size, 1200)
    n = MODEL.context_length
    return WindowDataset.from_ids(ids[:1000], n, n), WindowDataset.from_ids(ids[1000:], n, n)


def lora_fit(runs_dir, fsdp: int = 1):
    """Three LoRA steps (with an evaluation) from fixed base weights and adapters."""
    base = init_params(MODEL, jax.random.key(0), boxed=True)  # values with their logical axes
    trainable, frozen = lora.partition(base, LORA, jax.random.key(1))
    mesh = MeshConfig(data=1, fsdp=fsdp) if fsdp > 1 else MeshConfig()
    cfg = RunConfig(
        name="lora", runs_dir=str(runs_dir), model=MODEL, mesh=mesh,
        optim=OptimConfig(learning_rate=1e-2),
        train=TrainConfig(batch_size=8, max_steps=3, eval_freq=2, eval_iter=1, checkpoint_every=100,
                          progress=False, sample_tokens=0),
    )
    train, val = datasets()
    loss_fn = lora.lora_loss_fn(lm_loss_fn(MODEL), LORA)
    return fit(cfg, Trainable(loss_fn, params=trainable, frozen=frozen), train, val)


def adam_mu(opt_state):
    """The first-moment tree of the (only) Adam state inside an optax chain."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)).mu


def flat_host(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(v)) for k, v in lora._flat(tree).items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("runs_dir")
    p.add_argument("--fsdp", type=int, default=1)
    a = p.parse_args()
    result = lora_fit(a.runs_dir, a.fsdp)
    out = Path(a.out_dir)
    np.savez(out / "trainable.npz", **flat_host(result.state.params))
    params, mu = lora._flat(result.state.params), lora._flat(adam_mu(result.state.opt_state))
    specs = {path: [list(params[path].sharding.spec), list(mu[path].sharding.spec)]
             for path in SPEC_PATHS}
    (out / "specs.json").write_text(json.dumps({"devices": jax.device_count(), "specs": specs}))
    print("DONE", int(result.state.step))


if __name__ == "__main__":
    main()
