"""Targets: the chips a run can be planned for, by name, and their devices without the hardware.

A target names a chip and a count: `h100`, `h100x8`, `h200x8` (GPUs on one host; `h100x8x2`
is 8 GPUs on each of 2 hosts), `v5e-4`, `v5e-8`, `v4-8`, `v5p-8` (TPU slices named as Cloud TPU
names them: v5e counts chips, v4 and v5p count TensorCores, two per chip), or a TPU topology
(`v5e:4x4`, `v4:2x2x2`). `local` is the devices of this machine. Parsing is pure; the devices
come from `jax.experimental.topologies.get_topology_desc`, which needs the `libtpu` wheel for
TPUs and the CUDA plugin plus a target description (gpu_targets/*.txtpb, shipped with the
package) for GPUs; without them `target_devices` says in one line which extra to install.

Chip figures are datasheet peaks (dense bfloat16 FLOP/s, HBM bytes/s) and HBM per chip;
a GPU's memory and bandwidth are read from its target description.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from pathlib import Path

DESCRIPTIONS = Path(__file__).resolve().parent / "gpu_targets"
TPU_EXTRA = 'pip install "jaxgpt[tpu-plan]"'
GPU_EXTRA = 'pip install "jaxgpt[gpu-plan]"'


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    platform: str  # "gpu" or "tpu"
    peak_flops: float  # dense bfloat16 FLOP/s
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    description: str | None = None  # GPU target description file in gpu_targets/
    cores_per_chip: int = 1  # TensorCores in the slice name (v4-8: 4 chips)
    grid_dims: int = 2  # TPU topology dimensions (v5e 2-D, v4/v5p 3-D)


CHIPS = {
    "h100": Chip("H100 SXM", "gpu", 989e12, 0, 0.0, "h100_sxm.txtpb"),
    "h200": Chip("H200", "gpu", 989e12, 0, 0.0, "h200.txtpb"),
    "v5e": Chip("TPU v5e", "tpu", 197e12, 16 << 30, 819e9),
    "v4": Chip("TPU v4", "tpu", 275e12, 32 << 30, 1228e9, cores_per_chip=2, grid_dims=3),
    "v5p": Chip("TPU v5p", "tpu", 459e12, 95 << 30, 2765e9, cores_per_chip=2, grid_dims=3),
}
NAMED = ("h100", "h100x8", "h200", "h200x8", "v5e-1", "v5e-4", "v5e-8", "v4-8", "v5p-8")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    chip: Chip
    chips: int  # devices the step runs on (one per chip)
    hosts: int  # 0 for TPUs: the topology decides (see `target_devices`' process indices)
    topology: str  # get_topology_desc's: "1xHxN" for CUDA, "v5e:2x2" for TPU; "" for local


def _gpu_figures(chip: Chip) -> Chip:
    """A GPU's HBM size and bandwidth from its target description."""
    text = (DESCRIPTIONS / chip.description).read_text()
    field = lambda key: float(re.search(rf"\b{key}:\s*([0-9.e+]+)", text).group(1))  # noqa: E731
    return dataclasses.replace(chip, hbm_bytes=int(field("device_memory_size")),
                               hbm_bandwidth=field("memory_bandwidth"))


def tpu_grid(chips: int, dims: int) -> str:
    """A slice shape for `chips` chips as Cloud TPU lays them out: 2-D 1x1, 1x2, 2x2, 2x4,
    4x4...; 3-D 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4..."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"a TPU slice of {chips} chips: the count must be a power of two")
    order = (1, 0) if dims == 2 else (0, 1, 2, 2, 1, 0)
    shape = [1] * dims
    for i in range(int(math.log2(chips))):
        shape[order[i % len(order)]] *= 2
    return "x".join(map(str, shape))


def parse_target(name: str) -> Target:
    """The target a name denotes; a one-line ValueError naming the accepted forms otherwise."""
    forms = (f"choose one of {', '.join(NAMED)}, or <h100|h200>x<gpus>[x<hosts>], "
             "<v5e|v4|v5p>-<count> or a TPU topology such as v5e:4x4 or v4:2x2x2")
    key = name.strip().lower()
    if m := re.fullmatch(r"(h100|h200)(?:x(\d+))?(?:x(\d+))?", key):
        chip = _gpu_figures(CHIPS[m[1]])
        per_host, hosts = int(m[2] or 1), int(m[3] or 1)
        if per_host < 1 or hosts < 1:
            raise ValueError(f"--target {name!r}: GPU and host counts must be positive")
        return Target(key, chip, per_host * hosts, hosts, f"1x{hosts}x{per_host}")
    if m := re.fullmatch(r"(v5e|v4|v5p)-(\d+)", key):
        chip = CHIPS[m[1]]
        count = int(m[2])
        if count % chip.cores_per_chip:
            raise ValueError(f"--target {name!r}: {m[1]} slices count TensorCores, "
                             f"{chip.cores_per_chip} per chip")
        chips = count // chip.cores_per_chip
        try:
            return Target(key, chip, chips, 0, f"{m[1]}:{tpu_grid(chips, chip.grid_dims)}")
        except ValueError as err:
            raise ValueError(f"--target {name!r}: {err}") from None
    if m := re.fullmatch(r"(v5e|v4|v5p):(\d+(?:x\d+){1,2})", key):
        chip, dims = CHIPS[m[1]], [int(d) for d in m[2].split("x")]
        if len(dims) != chip.grid_dims or min(dims) < 1:
            raise ValueError(f"--target {name!r}: a {m[1]} topology has {chip.grid_dims} dimensions")
        return Target(key, chip, math.prod(dims), 0, key)
    if key == "local":
        return Target("local", None, 0, 1, "")
    raise ValueError(f"unknown --target {name!r}: {forms}")


def missing_extra(platform: str) -> str | None:
    """The one-line install hint when the compiler for `platform` is absent, else None."""
    if platform == "tpu" and importlib.util.find_spec("libtpu") is None:
        return f"planning for a TPU needs the libtpu compiler: {TPU_EXTRA}"
    if platform == "gpu" and (importlib.util.find_spec("jax_plugins") is None
                              or importlib.util.find_spec("jax_plugins.xla_cuda12") is None):
        return f"planning for a GPU needs the CUDA compiler plugin: {GPU_EXTRA}"
    return None


def target_devices(target: Target) -> list:
    """The target's devices, one per chip: compile-only devices of its topology (or, for
    `local`, this machine's). RuntimeError in one line when the compiler is not installed."""
    import jax

    if target.name == "local":
        return jax.devices()
    hint = missing_extra(target.chip.platform)
    if hint:
        raise RuntimeError(hint)
    from jax.experimental import topologies

    if target.chip.platform == "gpu":
        text = (DESCRIPTIONS / target.chip.description).read_text()
        desc = topologies.get_topology_desc(platform="cuda", topology=target.topology,
                                            target_config=text)
    else:
        # libtpu's default host holds 2x2x1 chips; a smaller slice, and a v5e slice of up to
        # 8 chips (v5litepod-8 is one host), is one host of its own size.
        dims = [int(d) for d in target.topology.split(":")[1].split("x")]
        one_host = target.chips < 4 or (target.chip.name == "TPU v5e" and target.chips <= 8)
        extra = {"chips_per_host_bounds": tuple(dims + [1] * (3 - len(dims)))} if one_host else {}
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # planners in parallel
        desc = topologies.get_topology_desc(platform="tpu", topology_name=target.topology, **extra)
    # v4 and v5p show both TensorCores of a chip; a step runs on the chip (megacore): core 0.
    return [d for d in desc.devices if getattr(d, "core_on_chip", 0) == 0]


def local_target() -> Target:
    """This machine's devices as a target, figures from the chip table where it knows them."""
    import jax

    devices = jax.devices()
    kind = devices[0].device_kind.lower()
    key = next((k for k in ("h200", "h100", "v5p", "v4") if k in kind),
               "v5e" if "v5 lite" in kind or "v5e" in kind else None)
    chip = CHIPS.get(key)
    if chip is not None and chip.description:
        chip = _gpu_figures(chip)
    if chip is None:  # an unknown chip: its platform, no datasheet figures
        chip = Chip(devices[0].device_kind, devices[0].platform, 0.0, 0, 0.0)
    return Target("local", chip, len(devices), jax.process_count(), "")
