"""Multi-process training on CPU: 2 processes x 2 devices behave exactly like 1 process x 4.

Each worker (tests/e2e/workers/multihost_run.py) is a real JAX process joined through
`jax.distributed` (gloo collectives on CPU). The harness starts them itself, bounds them in time
and kills every one of them as soon as any fails, so a dead process fails the test, never hangs it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "e2e" / "workers" / "multihost_run.py"
# D=16 and H=2 split over fsdp=2 and tensor=2; drop_rate 0 so every layout computes the same sum.
TINY = [
    "model.context_length=16", "model.emb_dim=16", "model.n_heads=2", "model.n_layers=2",
    "model.drop_rate=0.0", "model.dtype=float32", "train.batch_size=8", "train.eval_freq=2",
    "train.eval_iter=1", "train.sample_tokens=0", "train.checkpoint_every=3",
    "train.progress=false", "optim.learning_rate=1e-2", "optim.eps=1e-5",
]
SPLIT = ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2"]


class WorkerFailed(AssertionError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir: Path, runs_dir: Path, corpus: str, *args: str, processes: int, devices: int,
           timeout: float = 240.0, die: int | None = None) -> list[str]:
    """Run `processes` workers to completion and return their logs; on the first failure (or
    the deadline) kill them all and raise with the logs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env["JAX_PLATFORMS"] = "cpu"  # no TPU or GPU probing where the planner's compilers are installed
    procs, logs = [], []
    for i in range(processes):
        group = [] if processes == 1 else [
            "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
            "--process-id", str(i)]
        logs.append(out_dir / f"log{i}.txt")
        cmd = [sys.executable, str(WORKER), str(out_dir), str(runs_dir), corpus,
               "--devices", str(devices), *group, *(["--die"] if die == i else []), *args]
        with logs[-1].open("w") as log:
            # A session of its own, so killing it takes any helper process with it.
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                return [path.read_text() for path in logs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed or time.monotonic() > deadline:
                why = (f"process {failed[0]} exited with {codes[failed[0]]}" if failed
                       else f"timed out after {timeout:.0f}s")
                tails = "\n".join(f"--- process {i} ---\n{path.read_text()[-2000:]}"
                                  for i, path in enumerate(logs))
                raise WorkerFailed(f"{why}\n{tails}")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _records(out_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("process*.json"))]


def _npz(path: Path) -> dict:
    with np.load(path) as f:
        return dict(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """two: 2 processes x 2 devices, 3 steps. one: 1 process x 4 devices, 5 steps, same mesh.
    moved: run `two` resumed to step 5 by 1 process on 2 devices with a data=2 mesh."""
    base = tmp_path_factory.mktemp("multihost")
    logs = {}
    logs["two"] = launch(base / "two", base / "two-runs", corpus, *TINY, *SPLIT,
                         "train.max_steps=3", processes=2, devices=2)
    logs["one"] = launch(base / "one", base / "one-runs", corpus, *TINY, *SPLIT,
                         "train.max_steps=5", "--load", "3:one", processes=1, devices=4)
    logs["moved"] = launch(base / "moved", base / "two-runs", corpus, *TINY, "mesh.data=2",
                           "mesh.fsdp=1", "mesh.tensor=1", "train.max_steps=5",
                           "--load", "3:1,2,1", processes=1, devices=2)
    return base, logs


def test_two_processes_equal_one_process_on_the_same_devices(runs):
    base, _ = runs
    two, one = _records(base / "two"), _records(base / "one")[0]
    assert [r["processes"] for r in two] == [2, 2] and [r["devices"] for r in two] == [4, 4]
    assert two[0]["losses"] == two[1]["losses"]  # metrics are global, whoever reads them
    np.testing.assert_allclose(two[0]["losses"], one["losses"][:3], rtol=1e-5)
    assert one["losses"][2] < one["losses"][0]
    at3 = _npz(base / "one" / "load-3.npz")
    got = _npz(base / "two" / "params.npz")
    assert got.keys() == at3.keys()
    for k in got:
        np.testing.assert_allclose(got[k], at3[k], atol=1e-5, err_msg=k)


def test_each_process_reads_a_disjoint_share_of_every_batch(runs):
    base, _ = runs
    p0, p1 = _records(base / "two")
    one = _records(base / "one")[0]
    assert len(p0["rows"]) == len(p1["rows"]) >= 4  # report batch, eval batch, 3 steps
    for a, b, full in zip(p0["rows"], p1["rows"], one["rows"]):
        assert len(a) == len(b) == len(full) // 2
        assert not set(a) & set(b)
        assert sorted(a + b) == sorted(full)


def test_only_process_zero_writes(runs):
    base, logs = runs
    assert "sharding report" in logs["two"][0] and "train loss" in logs["two"][0]
    assert "sharding report" not in logs["two"][1] and "train loss" not in logs["two"][1]
    run = base / "two-runs" / "default"
    assert {"config.yaml", "metrics.jsonl", "loss.png"} <= {p.name for p in run.iterdir()}
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5]  # written once each (the resumed run added 4 and 5)


def test_checkpoint_from_two_processes_restores_on_another_mesh(runs):
    base, _ = runs
    moved = _records(base / "moved")[0]
    assert moved["processes"] == 1 and moved["devices"] == 2
    specs = moved["load-3"]
    assert specs["['wte']['embedding']"] == ["None", "fsdp"]
    assert specs["['h_0']['attn']['query']['kernel']"] == ["fsdp", "None", "None"]
    loaded, saved = _npz(base / "moved" / "load-3.npz"), _npz(base / "two" / "params.npz")
    assert loaded.keys() == saved.keys()
    for k in saved:
        np.testing.assert_array_equal(loaded[k], saved[k], err_msg=k)


def test_resume_on_a_new_topology_continues_the_run(runs):
    base, _ = runs
    moved, one = _records(base / "moved")[0], _records(base / "one")[0]
    np.testing.assert_allclose(moved["losses"], one["losses"][3:], rtol=1e-5)
    final, ref = _npz(base / "moved" / "params.npz"), _npz(base / "one" / "params.npz")
    for k in ref:
        np.testing.assert_allclose(final[k], ref[k], atol=1e-5, err_msg=k)


def test_a_dead_process_fails_the_run_without_hanging(tmp_path, corpus):
    start = time.monotonic()
    with pytest.raises(WorkerFailed, match="process 1 exited with 3"):
        launch(tmp_path / "out", tmp_path / "runs", corpus, *TINY, *SPLIT, "train.max_steps=3",
               processes=2, devices=2, die=1, timeout=120)
    assert time.monotonic() - start < 120
