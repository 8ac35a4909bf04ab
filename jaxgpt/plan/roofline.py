"""FLOPs and the roofline: the fastest a step can run on a chip's datasheet peaks.

Analytic FLOPs per trained token are 6N + 12LDT (PaLM's appendix B, nanoGPT's estimate_mfu):
N the parameters that take part in matmuls (all but the learned position table), 6 for the
forward and backward products, 12LDT for attention's score and value products. The roofline
takes the longest of three lower bounds for a step, each per device: its FLOPs at the chip's
peak, its HBM traffic at the chip's bandwidth (XLA's "bytes accessed" where the compiled
program has a count, else the optimizer state's unavoidable traffic), and its collective bytes
at the interconnect's bandwidth. Real steps are slower (kernels below peak, collectives not
fully overlapped): the tokens/s is a ceiling and so is the MFU it implies.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from jaxgpt.config import GPTConfig
from jaxgpt.models.model import abstract_params

# Per-chip interconnect bandwidth, one direction (datasheets): NVLink 4 on H100/H200, ICI on TPU.
INTERCONNECT = {"H100 SXM": 450e9, "H200": 450e9, "TPU v5e": 200e9, "TPU v4": 300e9,
                "TPU v5p": 600e9}
# Bytes per parameter an AdamW step must move at least: the float32 parameter read and written,
# its gradient written and read, both moments read and written.
STATE_BYTES_PER_PARAM = 4 * 2 + 4 * 2 + 8 * 2


def matmul_params(config: GPTConfig) -> int:
    """N of 6N: every parameter but the learned position table (a lookup, no matmul)."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(config, boxed=False))[0]
    return sum(math.prod(x.shape) for path, x in flat
               if "wpe" not in "/".join(str(getattr(k, "key", k)) for k in path))


def train_flops_per_token(config: GPTConfig) -> float:
    """6N + 12 L D T for one trained token at the config's context length."""
    return (6 * matmul_params(config)
            + 12 * config.n_layers * config.n_heads * config.head_dim * config.context_length)


@dataclasses.dataclass(frozen=True)
class Roofline:
    compute_s: float
    memory_s: float
    collective_s: float
    step_s: float  # the longest of the three
    bound: str  # "compute", "memory" or "collectives"
    tokens_per_s: float  # all chips together
    mfu: float  # the model FLOPs' share of the chips' peak at step_s


def roofline(chip, chips: int, tokens: float, model_flops: float, device_flops: float,
             hbm_bytes: float, collective_bytes: float) -> Roofline | None:
    """The bound for a step moving `tokens` with `model_flops` in all (analytic, for MFU) and,
    per device, `device_flops`, `hbm_bytes` of HBM traffic and `collective_bytes`."""
    if not chip.peak_flops or not chip.hbm_bandwidth:
        return None
    times = {"compute": device_flops / chip.peak_flops,
             "memory": hbm_bytes / chip.hbm_bandwidth,
             "collectives": collective_bytes / INTERCONNECT.get(chip.name, math.inf)}
    bound = max(times, key=times.get)
    step = max(times[bound], 1e-12)
    return Roofline(times["compute"], times["memory"], times["collectives"], step, bound,
                    tokens / step, model_flops / (step * chip.peak_flops * chips))
