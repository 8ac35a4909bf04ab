"""What would make a run fit, and which shapes fit at all: each answer is a compile.

`fit_advice` tries, one change at a time, the levers a run has: a smaller micro-batch by more
accumulation (the same global batch), half the batch, full rematerialisation, FSDP over every
chip; each is compiled and its peak reported. `search` tries the mesh shapes the chip count
allows (data, fsdp and tensor splits) with the micro-batch sizes the batch allows and returns
those that fit, fastest roofline first.
"""

from __future__ import annotations

import dataclasses

from jaxgpt.config import GPTConfig
from jaxgpt.plan.planner import Shape, check_shape, plan_train
from jaxgpt.plan.targets import Target
from jaxgpt.sharding import MeshConfig
from jaxgpt.training.runconfig import OptimConfig


def levers(shape: Shape, chips: int) -> list[tuple[str, Shape]]:
    """The one-change variants of `shape` that use less memory, named."""
    out = []
    if (shape.batch_size // shape.accum_steps) % 2 == 0:
        a = shape.accum_steps * 2
        out.append((f"optim.accum_steps={a} (micro-batch halved, same batch)",
                    dataclasses.replace(shape, accum_steps=a)))
    if shape.batch_size % 2 == 0 and (shape.batch_size // 2) % shape.accum_steps == 0:
        out.append((f"train.batch_size={shape.batch_size // 2}",
                    dataclasses.replace(shape, batch_size=shape.batch_size // 2)))
    if shape.remat_policy != "full":
        out.append(("model.remat_policy=full", dataclasses.replace(shape, remat_policy="full")))
    if chips > 1 and not (shape.mesh.fsdp in (-1, chips)):
        out.append((f"mesh.data=1 mesh.fsdp={chips} mesh.tensor=1 (FSDP over every chip)",
                    dataclasses.replace(shape, mesh=MeshConfig(data=1, fsdp=chips, tensor=1))))
    return out


def fit_advice(config: GPTConfig, optim: OptimConfig, shape: Shape, target: Target, devices,
               budget: int) -> list[dict]:
    """For a shape that does not fit: each lever's peak and whether it fits."""
    advice = []
    for change, variant in levers(shape, len(devices)):
        try:
            check_shape(variant, len(devices))
        except ValueError:
            continue
        rec = plan_train(config, optim, variant, target, devices, budget)
        advice.append({"change": change, "peak": rec["memory"].get("peak"),
                       "fits": rec["memory"].get("fits", False)})
    return advice


def mesh_shapes(chips: int, config: GPTConfig) -> list[MeshConfig]:
    """Every (data, fsdp, tensor) split of `chips` whose tensor axis divides the heads."""
    out = []
    for tensor in [t for t in range(1, chips + 1) if chips % t == 0]:
        if config.n_heads % tensor:
            continue
        rest = chips // tensor
        for fsdp in [f for f in range(1, rest + 1) if rest % f == 0]:
            out.append(MeshConfig(data=rest // fsdp, fsdp=fsdp, tensor=tensor))
    return out


def candidates(config: GPTConfig, shape: Shape, chips: int, limit: int) -> list[Shape]:
    """Shapes to try: each mesh with each accumulation that splits the batch evenly."""
    out = []
    for mesh in mesh_shapes(chips, config):
        a = 1
        while a <= shape.batch_size:
            variant = dataclasses.replace(shape, mesh=mesh, accum_steps=a)
            try:
                check_shape(variant, chips)
                out.append(variant)
            except ValueError:
                pass
            a *= 2
    return out[:limit]


def search(config: GPTConfig, optim: OptimConfig, shape: Shape, target: Target, devices,
           budget: int, limit: int = 24) -> list[dict]:
    """The shapes that fit, fastest roofline first (each compiled)."""
    fits = []
    for variant in candidates(config, shape, len(devices), limit):
        rec = plan_train(config, optim, variant, target, devices, budget)
        if rec["memory"].get("fits", True):
            fits.append(rec)
    return sorted(fits, key=lambda r: (r["roofline"] or {}).get("step_s", 0.0))
