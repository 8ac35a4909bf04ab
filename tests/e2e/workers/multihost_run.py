"""One process of a (possibly multi-process) pretraining run on CPU devices, for test_multihost.

    python tests/e2e/workers/multihost_run.py OUT_DIR RUNS_DIR CORPUS --devices N
        [--coordinator HOST:PORT --num-processes P --process-id I] [--load STEP:D,F,T|one ...]
        [--die] [key=value ...]

Writes OUT_DIR/process<I>.json (losses, the dataset rows this process read at each step) and,
from process 0, OUT_DIR/params.npz (the final parameters, gathered from every process). Each
--load restores a checkpoint of the run with `load_model` onto a (data, fsdp, tensor)
mesh (or one device) and saves it as OUT_DIR/load-STEP.npz. --die crashes right after joining.
"""

import argparse
import json
import os
import sys
from pathlib import Path


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("runs_dir")
    p.add_argument("corpus")
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--coordinator")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--load", action="append", default=[])
    p.add_argument("--die", action="store_true")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args()
    # The device count and collectives must be chosen before JAX starts.
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

    import jax
    import numpy as np

    import jaxgpt.tasks.pretraining as pretraining
    from jaxgpt.distributed import host_copy, maybe_initialize
    from jaxgpt.weights.loader import load_model
    from jaxgpt.sharding import make_mesh
    from jaxgpt.training.runconfig import MeshConfig, load_config

    dist = []
    if a.coordinator:
        dist = [f"distributed.coordinator_address={a.coordinator}",
                f"distributed.num_processes={a.num_processes}",
                f"distributed.process_id={a.process_id}", "distributed.initialization_timeout=60"]
    cfg = load_config(None, [f"runs_dir={a.runs_dir}", f"data.source={a.corpus}", *dist,
                             *a.overrides])
    maybe_initialize(cfg)
    assert jax.process_count() == (a.num_processes or 1) and jax.local_device_count() == a.devices
    if a.die:
        os._exit(3)  # a crash: no clean shutdown that the others could wait on

    read: list[list[int]] = []

    class Recorded:
        """The training windows, noting which rows this process asks for."""

        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def rows(self, indices):
            read.append([int(i) for i in indices])
            return self.inner.rows(indices)

    def recorded_windows(c):
        train, val = windows(c)
        return Recorded(train), val

    windows = pretraining.window_datasets
    pretraining.window_datasets = recorded_windows
    result = pretraining.pretrain(cfg)
    params = host_copy(result.state.params)  # a collective: every process takes part
    out = Path(a.out_dir)
    losses = [r["loss"] for r in result.history if r["kind"] == "train"]
    record = {"process": jax.process_index(), "processes": jax.process_count(),
              "devices": jax.device_count(), "losses": losses, "rows": read}
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(k): v
                for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(out / "params.npz", **flat)
    for spec in a.load:
        step, shape = spec.split(":")
        mesh = None if shape == "one" else make_mesh(MeshConfig(*map(int, shape.split(","))))
        _, loaded = load_model(Path(a.runs_dir) / cfg.name, step=int(step), mesh=mesh)
        record[f"load-{step}"] = {
            jax.tree_util.keystr(k): list(map(str, getattr(v.sharding, "spec", ())))
            for k, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
        flat = {jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_flatten_with_path(host_copy(loaded))[0]}
        if jax.process_index() == 0:
            np.savez(out / f"load-{step}.npz", **flat)
    (out / f"process{jax.process_index()}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
