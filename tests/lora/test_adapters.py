"""Adapters on disk are crash-safe and checked: a save commits by one rename (a kill at any
moment leaves the old or the new adapters loadable, never neither), and a damaged or truncated
file is refused in one line naming it, quietly, before Orbax reads it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "e2e" / "workers" / "adapter_save.py"
sys.path.insert(0, str(WORKER.parent))
from adapter_save import LORA, trees  # noqa: E402

from jaxgpt.lora.adapters import ITEMS, META, load_adapters, save_adapters  # noqa: E402


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_save_over_adapters_replaces_them_whole(tmp_path):
    params, first = trees(1)
    _, second = trees(2)
    save_adapters(tmp_path / "ad", first, LORA, params)
    save_adapters(tmp_path / "ad", second, LORA, params)
    assert sorted(os.listdir(tmp_path / "ad")) == sorted([ITEMS[1], META])
    loaded, _ = load_adapters(tmp_path / "ad", params)
    assert _same(loaded, second) and not _same(loaded, first)
    save_adapters(tmp_path / "ad", first, LORA, params)  # and back to the first item name
    assert sorted(os.listdir(tmp_path / "ad")) == sorted([ITEMS[0], META])
    assert _same(load_adapters(tmp_path / "ad", params)[0], first)


@pytest.fixture
def saved(tmp_path):
    params, trainable = trees(3)
    save_adapters(tmp_path / "ad", trainable, LORA, params)
    meta = json.loads((tmp_path / "ad" / META).read_text())
    return tmp_path / "ad", params, meta


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_file_is_refused_naming_it(saved, damage):
    directory, params, meta = saved
    rel = max(meta["files"], key=lambda r: (directory / meta["adapters"] / r).stat().st_size)
    path = directory / meta["adapters"] / rel  # the largest: the arrays' data
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 3]))
    else:
        path.unlink()
    what = "is missing" if damage == "delete" else "is damaged"
    with pytest.raises(ValueError, match=f"{path.name} {what}"):
        load_adapters(directory, params)


def test_a_truncated_adapter_load_is_quiet_from_python(saved):
    # From Python, not a CLI: one exception naming the file, nothing else on stderr. (Orbax
    # itself restores some truncated data files without a word: the checksums catch them.)
    directory, _, meta = saved
    for rel in meta["files"]:  # every file truncated, as a full disk would leave them
        path = directory / meta["adapters"] / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from adapter_save import trees\n"
            "from jaxgpt.lora.adapters import load_adapters\n"
            "try:\n    load_adapters(sys.argv[1], trees(3)[0])\n"
            "except ValueError as e:\n    print('refused:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(directory), str(WORKER.parent)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert "refused:" in proc.stdout and "is damaged" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [], proc.stderr[-3000:]


@pytest.mark.parametrize("delay_ms", [0, 20, 80, 250, 600])
def test_a_kill_during_a_save_leaves_old_or_new_adapters(tmp_path, delay_ms):
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "ad"), str(delay_ms)],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    params, first = trees(1)
    _, second = trees(2)
    loaded, _ = load_adapters(tmp_path / "ad", params)
    assert _same(loaded, first) or _same(loaded, second)
    # And a save after the crash works and cleans up what the killed one left.
    save_adapters(tmp_path / "ad", second, LORA, params)
    assert _same(load_adapters(tmp_path / "ad", params)[0], second)
    assert len(os.listdir(tmp_path / "ad")) == 2
