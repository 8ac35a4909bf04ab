"""An int8 tree on 8-device CPU meshes, compared with one device (run by tests/weights/test_quantize.py).

    python tests/e2e/workers/quantized_sharded.py OUT.json

The device count must be fixed before JAX starts, hence a process of its own. For each mesh:
the logits of a host-quantized tree placed by `quantize.shardings`, of float weights placed
by the rules and then quantized where they lie, and of `load_model(..., mesh, weights="int8")`
on the same weights saved as a Hugging Face directory, each against the single-device int8 logits;
the partition spec of every q and scale, and the int8 bytes one device holds.
"""

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxgpt.config import GPTConfig  # noqa: E402
from jaxgpt.models.model import GPT, abstract_params, init_params  # noqa: E402
from jaxgpt.sharding import MeshConfig, boxed_shardings, make_mesh, traced_under  # noqa: E402
from jaxgpt.trees import flatten  # noqa: E402
from jaxgpt.weights.huggingface import save_pretrained  # noqa: E402
from jaxgpt.weights.loader import load_model  # noqa: E402
from jaxgpt.weights.quantize import quantize, shardings  # noqa: E402

# Sizes the meshes divide (as tests/test_sharding.py): V=40, D=24, H=8, F=96.
CFG = GPTConfig(vocab_size=40, context_length=16, emb_dim=24, n_heads=8, n_layers=2,
                drop_rate=0.0, dtype="float32", qkv_bias=True)
MESHES = {"fsdp8": MeshConfig(data=1, fsdp=8), "tensor8": MeshConfig(data=1, tensor=8),
          "fsdp2_tensor4": MeshConfig(data=1, fsdp=2, tensor=4)}


def forward(p, ids):
    return GPT(CFG).apply({"params": p}, ids)


def specs(tree) -> dict:
    return {path: list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec))
            for path, x in flatten(tree).items() if path.endswith(("kernel/q", "kernel/scale"))}


def main(out: str) -> None:
    params = init_params(CFG, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 9)), jnp.int32)
    host_q = quantize(params, "int8")
    ref = np.asarray(jax.jit(forward)(host_q, ids))
    hf_dir = Path(out).parent / "hf"
    save_pretrained(CFG, params, hf_dir)
    result = {}
    for name, shape in MESHES.items():
        mesh = make_mesh(shape)
        run = jax.jit(traced_under(forward, mesh))
        placed = jax.device_put(host_q, shardings(abstract_params(CFG), mesh, "int8"))
        floats = jax.device_put(params, boxed_shardings(abstract_params(CFG), mesh))
        requantized = quantize(floats, "int8")  # each q where its float kernel was
        grouped = jax.device_put(quantize(params, "int8", 6),
                                 shardings(abstract_params(CFG), mesh, "int8", 6))
        _, loaded = load_model(hf_dir, mesh=mesh, weights="int8", dtype="float32")
        same_place = all(requantized_leaf.sharding == placed_leaf.sharding for requantized_leaf,
                         placed_leaf in zip(jax.tree.leaves(requantized), jax.tree.leaves(placed)))
        qs = [x for p, x in flatten(placed).items() if p.endswith("/q")]
        result[name] = {
            "devices": len(mesh.devices.flat),
            "placed_diff": float(np.abs(np.asarray(run(placed, ids)) - ref).max()),
            "requantized_diff": float(np.abs(np.asarray(run(requantized, ids)) - ref).max()),
            "loaded_diff": float(np.abs(np.asarray(run(loaded, ids)) - ref).max()),
            "loaded_same_place": all(a.sharding == b.sharding for a, b in
                                     zip(jax.tree.leaves(loaded), jax.tree.leaves(placed))),
            "same_place": same_place,
            "specs": specs(placed),
            "group_specs": specs(grouped),
            "q_bytes": sum(x.nbytes for x in qs),
            "q_bytes_per_device": sum(x.addressable_shards[0].data.nbytes for x in qs),
        }
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
