"""The training scripts' persistent compilation cache: where it lives, its off switch, its
refusal of a directory another user owns, and that JAX writes compiled programs into it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxgpt import entrypoint as common

ROOT = Path(__file__).resolve().parents[1]


def test_directory_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXGPT_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("JAXGPT_CACHE_DIR", str(tmp_path / "c"))
    assert common.compile_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("JAXGPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert common.compile_cache_dir() == tmp_path / "xdg" / "jaxgpt" / "xla"
    for off in ("0", "false", "OFF"):
        monkeypatch.setenv("JAXGPT_COMPILE_CACHE", off)
        assert common.compile_cache_dir() is None
        assert common.enable_compile_cache() is None


def test_a_directory_of_another_user_is_refused(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXGPT_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("JAXGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(os, "getuid", lambda: tmp_path.stat().st_uid + 1)
    with pytest.warns(UserWarning, match="belongs to another user"):
        assert common.enable_compile_cache() is None


def test_compiled_programs_land_in_the_cache(tmp_path):
    cache = tmp_path / "xla"
    code = (
        "from jaxgpt.entrypoint import enable_compile_cache\n"
        "d = enable_compile_cache()\n"
        "import jax, jax.numpy as jnp\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
        "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()\n"
        "print(d)\n"
    )
    env = {**os.environ, "JAXGPT_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    env.pop("JAXGPT_COMPILE_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == str(cache)
    assert oct(cache.stat().st_mode & 0o777) == oct(0o700)
    assert any(f.is_file() for f in cache.rglob("*"))  # a compiled program was written
