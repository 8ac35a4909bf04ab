"""Save LoRA adapters A, then B over them, killed with SIGKILL `delay_ms` into B's save.

    python tests/e2e/workers/adapter_save.py OUT_DIR DELAY_MS

`trees(seed)` gives the base params and the trainable tree of each save, so the test that runs
this can rebuild what each save held.
"""

import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import jax  # noqa: E402

from jaxgpt.config import GPTConfig  # noqa: E402
from jaxgpt.lora import transform as lora  # noqa: E402
from jaxgpt.lora.adapters import save_adapters  # noqa: E402
from jaxgpt.models.model import init_params  # noqa: E402

CONFIG = GPTConfig(vocab_size=17, context_length=11, emb_dim=12, n_heads=3, n_layers=2,
                   drop_rate=0.0, dtype="float32")
LORA = lora.LoRAConfig(rank=3, alpha=5.0, trainable=("ln_f",))


def trees(seed: int):
    """(base params, trainable) with adapters and the ln_f leaves drawn from `seed`."""
    params = init_params(CONFIG, jax.random.key(0))
    trainable, _ = lora.partition(params, LORA, jax.random.key(1))
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return params, jax.tree.unflatten(tree, [x + jax.random.normal(k, x.shape)
                                             for x, k in zip(leaves, keys)])


def main():
    out, delay_ms = Path(sys.argv[1]), int(sys.argv[2])
    params, first = trees(1)
    save_adapters(out, first, LORA, params)
    _, second = trees(2)
    jax.block_until_ready(second)
    threading.Timer(delay_ms / 1000, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    save_adapters(out, second, LORA, params)
    print("saved", flush=True)
    threading.Event().wait(60)  # the timer ends the process


if __name__ == "__main__":
    main()
