"""Train steps on an 8-device CPU mesh, compared with one device (run by tests/test_sharding.py).

    python tests/e2e/workers/sharded_step.py  ->  one line "RESULT {json}" on stdout

The device count must be fixed before JAX starts, hence a process of its own. For each mesh it
reports the largest differences from the single-device run (losses, parameters, Adam moments),
the partition spec of every state leaf, and how many activation constraints the step carries.
"""

import json
import os
import re
import sys
from pathlib import Path

# Cheaper CPU code generation: these steps are compiled ten times and run twice each.
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxgpt.config import GPTConfig  # noqa: E402
from jaxgpt.models.model import init_params  # noqa: E402
from jaxgpt.sharding import make_mesh  # noqa: E402
from jaxgpt.training.losses import lm_loss_fn  # noqa: E402
from jaxgpt.training.optim import make_optimizer, schedule  # noqa: E402
from jaxgpt.training.report import sharding_report  # noqa: E402
from jaxgpt.training.runconfig import MeshConfig, OptimConfig  # noqa: E402
from jaxgpt.training.state import create_state  # noqa: E402
from jaxgpt.training.step import compile_steps  # noqa: E402

# V=40, T=7, D=24, H=8 (K=3), F=96, L=2: every split below divides, and no two sizes are equal.
CFG = GPTConfig(vocab_size=40, context_length=9, emb_dim=24, n_heads=8, n_layers=2,
                drop_rate=0.0, dtype="float32")
# Adam's first update is g / (|g| + eps): with the default eps=1e-8, a gradient that is zero
# up to rounding gets an update of either sign, so reduction order alone would move such a
# parameter by up to lr. A larger eps keeps the comparison about sharding, not rounding.
OPT = OptimConfig(learning_rate=1e-2, weight_decay=0.1, eps=1e-5)
MESHES = {
    "data8": dict(data=8), "fsdp8": dict(fsdp=8), "tensor8": dict(tensor=8),
    "data2_fsdp4": dict(data=2, fsdp=4), "data2_tensor4": dict(data=2, tensor=4),
    "fsdp2_tensor4": dict(fsdp=2, tensor=4),
}
VARIANTS = {  # model switches run on the fsdp2_tensor4 mesh
    "remat": dict(remat_policy="full"), "scan_remat": dict(scan_layers=True, remat_policy="dots"),
}
STEPS = 2


def _batch():
    rng = np.random.default_rng(7)
    ids = rng.integers(0, CFG.vocab_size, (STEPS, 2, 8, 8))  # [steps, A, B, T + 1]
    return [{"inputs": ids[s, :, :, :-1], "targets": ids[s, :, :, 1:]} for s in range(STEPS)]


def _stack(params):
    """h_0..h_{L-1} -> one h with a leading L axis (the scanned layout)."""
    blocks = [params[f"h_{i}"] for i in range(CFG.n_layers)]
    rest = {k: v for k, v in params.items() if not k.startswith("h_")}
    return dict(rest, h=jax.tree.map(lambda *xs: np.stack(xs), *blocks))


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def _specs(tree) -> dict:
    return {_path(p): [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _adam(opt_state):
    """The (mu, nu) trees of the AdamW state inside the optax chain."""
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu")):
        if hasattr(s, "mu"):
            return s.mu, s.nu
    raise AssertionError("no Adam state found")


def run(cfg, mesh, params, batches):
    tx = make_optimizer(OPT, 10)
    state, sh = create_state(cfg, tx, mesh, seed=0, params=params)
    train, _ = compile_steps(lm_loss_fn(cfg), tx, schedule(OPT, 10), sh, mesh)
    lowered = train.lower(state, batches[0], None)
    compiled = lowered.compile()  # jit reuses it for the first call below
    lowered = lowered.as_text()
    losses = []
    for b in batches:
        state, m = train(state, b, None)
        losses.append(float(m["loss"]))
    mu, nu = _adam(state.opt_state)
    # Shardy writes each constraint as `sdy.sharding_constraint %x <@mesh, [{"data"}, {}, ...]>`.
    found = re.findall(r"sdy.sharding_constraint [^<]*<@mesh, (\[[^>]*\])>", lowered)
    return dict(state=state, losses=losses, mu=mu, nu=nu, constraints=sorted(set(found)),
                compiled=compiled, tx=tx)


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
    assert jax.device_count() == 8, jax.devices()
    batches = _batch()
    params = jax.device_get(init_params(CFG, jax.random.key(3)))
    one = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    ref = run(CFG, one, params, batches)
    ref_params, ref_mu = jax.device_get(ref["state"].params), jax.device_get(ref["mu"])
    out = {"reference": {"losses": ref["losses"], "constraints": ref["constraints"]}}
    mesh_of = lambda name: make_mesh(MeshConfig(**{"data": 1, **MESHES[name]}))  # noqa: E731
    for name in MESHES:
        r = run(CFG, mesh_of(name), params, batches)
        out[name] = {
            "losses": r["losses"],
            "param_diff": _max_diff(r["state"].params, ref_params),
            "mu_diff": _max_diff(r["mu"], ref_mu),
            "params": _specs(r["state"].params), "mu": _specs(r["mu"]), "nu": _specs(r["nu"]),
            "step_spec": list(r["state"].step.sharding.spec),
            "constraints": r["constraints"],
            # What one device really holds of each parameter, to check the report against.
            "bytes": {_path(p): x.addressable_shards[0].data.nbytes
                      for p, x in jax.tree_util.tree_flatten_with_path(r["state"].params)[0]},
            "report": sharding_report(CFG, mesh_of(name), r["tx"], compiled=r["compiled"]),
        }
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    for name, switches in VARIANTS.items():
        cfg = CFG.replace(**switches)
        scanned = cfg.scan_layers
        r = run(cfg, mesh, _stack(params) if scanned else params, batches)
        got = jax.device_get(r["state"].params)
        out[name] = {
            "losses": r["losses"],
            "param_diff": _max_diff(got, _stack(ref_params) if scanned else ref_params),
            "params": _specs(r["state"].params), "mu": _specs(r["mu"]),
            "constraints": r["constraints"],
        }
    grid = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    out["mesh_grid"] = {"shape": dict(grid.shape), "ids": [d.id for d in grid.devices.ravel()],
                        "all_ids": [d.id for d in jax.devices()]}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
