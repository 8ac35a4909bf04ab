"""Train steps of a Llama-family model loaded straight onto a 4-device CPU mesh, compared with one
device (run by tests/weights/test_llama.py).

    python tests/e2e/workers/family_sharded.py HF_DIR  ->  one line "RESULT {json}" on stdout
"""

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4",
    "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxgpt.weights.loader import load_model  # noqa: E402
from jaxgpt.sharding import make_mesh  # noqa: E402
from jaxgpt.training.losses import lm_loss_fn  # noqa: E402
from jaxgpt.training.optim import make_optimizer, schedule  # noqa: E402
from jaxgpt.training.runconfig import MeshConfig, OptimConfig  # noqa: E402
from jaxgpt.training.state import create_state  # noqa: E402
from jaxgpt.training.step import compile_steps  # noqa: E402

OPT = OptimConfig(learning_rate=1e-2, weight_decay=0.1, eps=1e-5)
MESHES = {"fsdp2_tensor2": dict(fsdp=2, tensor=2), "tensor4": dict(tensor=4), "data4": dict(data=4)}


def run(directory, mesh, batches):
    cfg, params = load_model(directory, mesh=mesh, dtype="float32")
    specs = {"/".join(str(k.key) for k in p): [a if not isinstance(a, tuple) else list(a)
                                                 for a in x.sharding.spec]
             for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    tx = make_optimizer(OPT, 10)
    state, sh = create_state(cfg, tx, mesh, seed=0, params=params)
    train, _ = compile_steps(lm_loss_fn(cfg), tx, schedule(OPT, 10), sh, mesh)
    losses = []
    for b in batches:
        state, m = train(state, b, None)
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state.params), specs


def main():
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 41, (2, 1, 4, 8))  # [steps, A, B, T + 1]
    batches = [{"inputs": ids[s, :, :, :-1], "targets": ids[s, :, :, 1:]} for s in range(2)]
    ref_losses, ref, _ = run(sys.argv[1], make_mesh(MeshConfig(data=1), jax.devices()[:1]), batches)
    out = {"reference": ref_losses}
    for name, shape in MESHES.items():
        losses, got, specs = run(sys.argv[1], make_mesh(MeshConfig(**{"data": 1, **shape})), batches)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
        out[name] = {"losses": losses, "param_diff": diff, "specs": specs}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
