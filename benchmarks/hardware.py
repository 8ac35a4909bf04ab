"""What a benchmark ran on, printed beside its figures: CPU model, usable cores, load, device."""

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def hardware(device: bool = True) -> str:
    """One line: the CPU, its usable cores and load average, and (with `device`, which starts
    JAX) its first device."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    line = f"{cpu_model()}; {len(os.sched_getaffinity(0))} usable cores (load average {load:.1f})"
    if device:
        import jax

        line += f"; jax {jax.__version__} on {jax.devices()[0].device_kind}"
    return line
