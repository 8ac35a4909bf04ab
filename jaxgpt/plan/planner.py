"""Plan a run for a target: compile its steps there and say what they need and allow.

`plan(run, target)` compiles the run's train step and the serving engine's decode step for
the target's devices and returns one record (a dict of plain values, what `--json` writes):
memory per device against the chip's, FLOPs, the attention kernel chosen with the custom calls
that show it in the compiled program, collectives by kind, compile times and a roofline.
"""

from __future__ import annotations

import dataclasses
import os

from jaxgpt.config import GPTConfig
from jaxgpt.kernels.backend_attention import choose_attention
from jaxgpt.plan import program
from jaxgpt.plan.compile import compile_decode, compile_train, for_platform
from jaxgpt.plan.roofline import STATE_BYTES_PER_PARAM, matmul_params, roofline, train_flops_per_token
from jaxgpt.plan.targets import Target, target_devices
from jaxgpt.sharding import MeshConfig
from jaxgpt.training.runconfig import OptimConfig

# A GPU process gets this share of HBM unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise
# (JAX preallocates it); a TPU keeps a little for its runtime.
USABLE = {"gpu": 0.75, "tpu": 0.95}
MARGIN = 0.10  # of the usable memory, kept free: fragmentation, the runtime's own buffers


@dataclasses.dataclass(frozen=True)
class Shape:
    """What varies between plans of one run: the global batch, its split and the mesh."""

    batch_size: int
    accum_steps: int
    mesh: MeshConfig
    remat_policy: str


def usable_bytes(target: Target, limit: int | None = None) -> int:
    """The memory a step may use on one chip (`limit` overrides the chip's)."""
    if limit is not None:
        return limit
    share = USABLE.get(target.chip.platform, 1.0)
    if target.chip.platform == "gpu" and os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"):
        share = float(os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"])
    return int(target.chip.hbm_bytes * share)


def resolved_mesh(mesh: MeshConfig, chips: int) -> dict:
    """The mesh's axes with -1 resolved over `chips` (ValueError in one line if it cannot be)."""
    axes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    fixed = 1
    for v in axes.values():
        fixed *= v if v != -1 else 1
    if chips % fixed or (-1 not in axes.values() and fixed != chips):
        raise ValueError(f"mesh {' '.join(f'{k}={v}' for k, v in axes.items())} does not fit "
                         f"the target's {chips} chips")
    return {k: chips // fixed if v == -1 else v for k, v in axes.items()}


def check_shape(shape: Shape, chips: int) -> dict:
    """One-line errors before any compilation: the mesh must fit the chips and the batch split
    over it. Returns the resolved mesh axes."""
    axes = resolved_mesh(shape.mesh, chips)
    dp = axes["data"] * axes["fsdp"]
    if shape.batch_size % shape.accum_steps:
        raise ValueError(f"train.batch_size={shape.batch_size} is not divisible by "
                         f"optim.accum_steps={shape.accum_steps}")
    micro = shape.batch_size // shape.accum_steps
    if micro % dp:
        raise ValueError(f"a micro-batch of {micro} rows (train.batch_size / optim.accum_steps) "
                         f"does not split over {dp} data-parallel chips")
    return axes


def memory_record(mem: program.Memory | None, budget: int, params: int = 0, opt: int = 0) -> dict:
    out = {"parameters": params, "optimizer": opt, "budget": budget}
    if mem is not None:
        out.update(arguments=mem.arguments, outputs=mem.outputs, aliased=mem.aliased,
                   temporaries=mem.temporaries, peak=mem.peak,
                   fits=mem.peak <= budget * (1 - MARGIN), headroom=budget - mem.peak)
    return out


def attention_choice(config: GPTConfig, platform: str, rows: int, length: int) -> dict:
    """The selector's choice for the train step's attention and its reason (None: fused)."""
    if config.kernels == "reference":
        return {"kernel": "reference", "reason": "kernels=reference"}
    q = (rows, length, config.n_heads, config.head_dim)
    dropout = config.attention_drop_rate > 0
    name, reason = choose_attention(platform, config.compute_dtype, q, q, False, dropout)
    return {"kernel": name, "reason": reason}


def plan_train(config: GPTConfig, optim: OptimConfig, shape: Shape, target: Target, devices,
               budget: int) -> dict:
    """Compile the train step of one shape for the target; its record."""
    config = config.replace(remat_policy=shape.remat_policy)
    axes = check_shape(shape, len(devices))
    built = compile_train(config, optim, shape.mesh, devices, batch_size=shape.batch_size,
                          accum_steps=shape.accum_steps)
    text = built.program.as_text()
    calls = program.custom_calls(text)
    coll = program.collectives(text)
    cost = program.xla_cost(built.program)
    tokens = shape.batch_size * config.context_length
    model_flops = train_flops_per_token(config) * tokens
    rows = shape.batch_size // shape.accum_steps // (axes["data"] * axes["fsdp"])
    attention = attention_choice(config, target.chip.platform, rows, config.context_length)
    attention["evidence"] = program.attention_evidence(calls, attention["kernel"])
    state_traffic = STATE_BYTES_PER_PARAM * built.param_bytes / 4  # float32 parameters
    # XLA counts a loop body once (the accumulation scan): its FLOPs are reported, not used;
    # its bytes are a floor where they exceed the optimizer state's traffic.
    hbm = max(cost.get("bytes accessed", 0.0), state_traffic)
    roof = roofline(target.chip, len(devices), tokens, model_flops, model_flops / len(devices), hbm,
                    sum(c["bytes"] for c in coll.values()))
    return {
        "batch_size": shape.batch_size, "accum_steps": shape.accum_steps,
        "rows_per_device": rows, "mesh": axes, "remat_policy": shape.remat_policy,
        "compile_s": built.seconds,
        "memory": memory_record(program.memory(built.program), budget, built.param_bytes,
                                built.opt_bytes),
        "flops": {"analytic_per_token": train_flops_per_token(config),
                  "analytic_per_step": model_flops, "xla_per_device": cost.get("flops"),
                  "xla_bytes_per_device": cost.get("bytes accessed")},
        "attention": attention, "custom_calls": calls, "collectives": coll,
        "roofline": None if roof is None else dataclasses.asdict(roof),
    }


def plan_decode(config: GPTConfig, target: Target, device, budget: int, slots: int,
                max_len: int) -> dict:
    """Compile the engine's decode step for one chip; its record."""
    built = compile_decode(config, device, slots=slots, max_len=max_len)
    text = built.program.as_text()
    cost = program.xla_cost(built.program)
    mem = program.memory(built.program)
    cache = 2 * config.n_layers * slots * config.kv_heads * max_len * config.head_dim \
        * config.compute_dtype.itemsize
    weights = 4 * matmul_params(config)  # the engine holds float32 parameters
    hbm = cost.get("bytes accessed", weights + cache)
    roof = roofline(target.chip, 1, slots, 2 * matmul_params(config) * slots,
                    cost.get("flops", 2 * matmul_params(config) * slots), hbm, 0.0)
    return {"slots": slots, "max_len": max_len, "compile_s": built.seconds,
            "cache_bytes": cache, "memory": memory_record(mem, budget),
            "custom_calls": program.custom_calls(text),
            "roofline": None if roof is None else dataclasses.asdict(roof)}


def plan(config: GPTConfig, optim: OptimConfig, shape: Shape, target: Target, *,
         decode_slots: int = 32, memory_limit: int | None = None, devices=None) -> dict:
    """The record of a run planned for `target`: its train step and the engine's decode step."""
    devices = target_devices(target) if devices is None else devices
    config = for_platform(config, target.chip.platform)
    budget = usable_bytes(target, memory_limit)
    record = {"target": target.name, "chip": target.chip.name, "chips": len(devices),
              "hosts": len({d.process_index for d in devices}),
              "chip_memory": target.chip.hbm_bytes, "model": config.to_dict(),
              "parameters": matmul_params(config)}
    record["train"] = plan_train(config, optim, shape, target, devices, budget)
    if decode_slots:
        record["decode"] = plan_decode(config, target, devices[0], budget, decode_slots,
                                       config.context_length)
    return record
