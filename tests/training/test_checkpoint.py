"""Setting aside a run's uncommitted steps takes the run directory's lock: beside a live trainer
(another process holding it) it refuses in one line and renames nothing."""

import subprocess
import sys

import pytest

from jaxgpt.training.checkpoint import set_aside_incomplete
from jaxgpt.training.runlock import LOCK_NAME, RunDirInUse, acquire, release

HOLD = ("import fcntl, sys, time\n"
        "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('pid trainer'); f.flush()\n"
        "print('held', flush=True); time.sleep(60)\n")


def _run_dir(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "6").mkdir(parents=True)  # a step still being written: no commit marker yet
    (ckpt / "6" / "state").mkdir()
    return ckpt


def test_a_live_trainers_steps_are_never_moved(tmp_path):
    ckpt = _run_dir(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(ckpt.parent / LOCK_NAME)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUse, match="is in use by pid trainer"):
            set_aside_incomplete(ckpt)
        assert (ckpt / "6").is_dir()
    finally:
        holder.kill()
        holder.wait()
    moved = set_aside_incomplete(ckpt)  # the trainer is gone: its half-written step goes aside
    assert not (ckpt / "6").exists() and len(moved) == 1 and moved[0].name.startswith("incomplete-6-")


def test_the_trainer_holding_the_lock_sets_aside_itself(tmp_path):
    ckpt = _run_dir(tmp_path)
    acquire(ckpt.parent)
    try:
        assert len(set_aside_incomplete(ckpt)) == 1
        # Still held by this process afterwards: a second process is refused.
        other = subprocess.run([sys.executable, "-c",
                                "import fcntl, sys; f = open(sys.argv[1], 'a+')\n"
                                "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)",
                                str(ckpt.parent / LOCK_NAME)], capture_output=True)
        assert other.returncode != 0
    finally:
        release(ckpt.parent)


def test_a_truncated_checkpoint_file_is_named_as_such(tmp_path):
    import jax

    from jaxgpt import GPTConfig, init_params
    from jaxgpt.training.runconfig import RunConfig
    from jaxgpt.weights.loader import load_model
    from jaxgpt.weights.runs import CorruptCheckpoint
    from tests.conftest import TINY, write_run

    config = GPTConfig(**TINY)
    run = write_run(tmp_path / "run", RunConfig(model=config), {1: init_params(config, jax.random.key(0))})
    for f in (run / "checkpoints" / "1" / "state").rglob("ocdbt.process_0/d/*"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # as a full disk leaves them
    with pytest.raises(CorruptCheckpoint, match="cannot be read: a file of it is truncated or damaged") as err:
        load_model(str(run))
    assert "\n" not in str(err.value) and "TensorStore({" not in str(err.value)
