"""jaxgpt's glibc settings keep a compiled program's freed scratch for reuse (jaxgpt/hostmem.py).

Each case runs in a fresh process: the settings only reach threads that have not allocated yet.
The program calls a jitted function CALLS times; each call materializes a 64 MiB intermediate
(above glibc's largest mmap threshold). With glibc's defaults every call maps and faults it in
afresh, which the control case shows.
"""

import os
import subprocess
import sys
import textwrap

import pytest

CALLS = 30
PROGRAM = textwrap.dedent(f"""
    import resource, sys
    import jaxgpt
    from jaxgpt.hostmem import retain_freed_memory
    applied = retain_freed_memory() if sys.argv[1] == "call" else False  # as an entry point does
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x, w: jnp.tanh(x @ x.T) @ w)  # x @ x.T: a [4096, 4096] f32 scratch
    x, w = jnp.ones((4096, 64)), jnp.ones((4096, 8))
    f(x, w).block_until_ready()
    faults = []
    for _ in range({CALLS}):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x, w).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, *faults)
""")


def _faults_per_call(retain: str, call: bool = True) -> tuple[bool, list[int]]:
    env = dict(os.environ, JAXGPT_RETAIN_HOST_MEMORY=retain, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", PROGRAM, "call" if call else "import"], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", [int(n) for n in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_scratch_is_reused_not_faulted_again():
    applied, kept = _faults_per_call("1")
    off, default = _faults_per_call("0")
    assert applied and not off
    scratch_pages = 4096 * 4096 * 4 // os.sysconf("SC_PAGE_SIZE")
    # The control: with glibc's defaults every call faults the whole scratch in again.
    assert min(default) > 0.9 * scratch_pages
    # Retained: the first calls still grow the heap now and then (a smaller allocation took
    # part of the freed block, so the scratch did not fit), until the heap holds enough free
    # blocks; from then on every call reuses one. The last third of the calls is that steady
    # state, and over all the calls most of the faulting is gone.
    steady = kept[-CALLS // 3:]
    assert sorted(steady)[len(steady) // 2] < 0.01 * scratch_pages, kept
    assert sum(kept) < 0.3 * sum(default), (kept, default)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_importing_jaxgpt_leaves_malloc_alone():
    # Only an entry point that calls retain_freed_memory() changes the process's allocator.
    _, imported = _faults_per_call("1", call=False)
    scratch_pages = 4096 * 4096 * 4 // os.sysconf("SC_PAGE_SIZE")
    assert min(imported) > 0.9 * scratch_pages
