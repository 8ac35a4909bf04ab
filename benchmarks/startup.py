"""Start-up of a training run with and without the persistent compilation cache.

  python benchmarks/startup.py [--preset gpt2-small] [-- extra train_throughput.py arguments]

Runs `train_throughput.py --no-peer --steps 1` (the library's state init and train step, as the
Trainer builds them) three times in fresh processes: with the cache off (JAXGPT_COMPILE_CACHE=0),
with an empty cache directory (the first run, which fills it) and again with the filled cache (a
rerun), and prints the state-init, trace+lower and compile seconds of each, plus the process's
wall time, side by side, with the CPU model.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_model, usable_cores  # noqa: E402  (benchmarks/common.py)

HERE = Path(__file__).resolve().parent
LINE = re.compile(r"jax: state init ([\d.]+) s, trace\+lower ([\d.]+) s, compile ([\d.]+) s")


def run(extra: list[str], env: dict) -> tuple[float, float, float, float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(HERE / "train_throughput.py"), "--no-peer",
                          "--steps", "1", "--warmup", "0", *extra],
                         env=env, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t0
    found = LINE.search(out)
    if not found:
        raise SystemExit(f"no start-up line in the output:\n{out[-2000:]}")
    return (*map(float, found.groups()), wall)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--context", default="256")
    p.add_argument("--batch", default="2")
    p.add_argument("extra", nargs="*", help="more train_throughput.py arguments (after --)")
    args = p.parse_args()
    extra = ["--preset", args.preset, "--context", args.context, "--batch", args.batch, *args.extra]
    print(f"CPU: {cpu_model()}, {usable_cores()} usable cores; "
          f"train_throughput.py {' '.join(extra)}")
    with tempfile.TemporaryDirectory() as cache:
        base = {**os.environ, "PYTHONPATH": str(HERE.parent)}
        rows = {
            "cache off": run(extra, {**base, "JAXGPT_COMPILE_CACHE": "0"}),
            "cache empty (first run)": run([*extra, "--compile-cache", cache], base),
            "cache filled (rerun)": run([*extra, "--compile-cache", cache], base),
        }
        size = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file())
    print(f"\n{'':26s} {'state init':>10s} {'trace+lower':>11s} {'compile':>8s} {'process':>8s}")
    for name, (init, lower, comp, wall) in rows.items():
        print(f"{name:26s} {init:9.1f}s {lower:10.1f}s {comp:7.1f}s {wall:7.1f}s")
    off, warm = rows["cache off"], rows["cache filled (rerun)"]
    print(f"\nrerun / cache off: state init {warm[0] / off[0]:.2f}x, compile {warm[2] / off[2]:.2f}x, "
          f"process {warm[3] / off[3]:.2f}x; cache holds {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
