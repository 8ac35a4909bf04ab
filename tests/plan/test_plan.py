"""Planning compiles the real steps for chips that are not here (needs jaxgpt[tpu-plan] and
jaxgpt[gpu-plan]; each part skips without its extra): the fused attention kernel is chosen for
the target, not the host, and is in the compiled program; the mesh's collectives are there;
FSDP splits the state; GPT-2 124M's step fits the chips it is trained on."""

import importlib.util

import pytest

from jaxgpt.config import GPTConfig
from jaxgpt.plan import planner
from jaxgpt.plan.targets import parse_target, target_devices
from jaxgpt.sharding import MeshConfig
from jaxgpt.training.runconfig import OptimConfig

HAS_TPU = importlib.util.find_spec("libtpu") is not None
HAS_GPU = (importlib.util.find_spec("jax_plugins") is not None
           and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None)


def _require(target: str) -> None:
    """Skip, naming the extra, where the target's compiler is not installed."""
    if target.startswith("h") and not HAS_GPU:
        pytest.skip('GPU planning needs pip install "jaxgpt[gpu-plan]"')
    if target.startswith("v") and not HAS_TPU:
        pytest.skip('TPU planning needs pip install "jaxgpt[tpu-plan]"')

GPT2 = GPTConfig.preset("gpt2-small", context_length=1024, dtype="bfloat16", drop_rate=0.0,
                        tie_embeddings=True, qkv_bias=True)
# Small, distinct sizes; T=128 is the Pallas kernel's block, head width 16 a multiple of 8 (cuDNN).
TINY = GPTConfig(vocab_size=211, context_length=128, emb_dim=48, n_heads=3, n_layers=2,
                 drop_rate=0.0, dtype="bfloat16")


def _plan(config, target, *, rows=8, mesh=MeshConfig(), accum=1, decode=0):
    t = parse_target(target)
    devices = target_devices(t)
    dp = len(devices) // (mesh.tensor if mesh.tensor > 0 else 1)
    shape = planner.Shape(rows * dp * accum, accum, mesh, config.remat_policy)
    return planner.plan(config, OptimConfig(), shape, t, decode_slots=decode, devices=devices)


@pytest.fixture(scope="module", params=["h100", "h100x8", "v5e-1", "v5e-4"])
def gpt2_plan(request):
    _require(request.param)
    return _plan(GPT2, request.param)


def test_gpt2_step_runs_the_fused_kernel_once_per_layer_and_fits(gpt2_plan):
    train, L = gpt2_plan["train"], GPT2.n_layers
    att = train["attention"]
    if gpt2_plan["target"].startswith("h"):
        assert att["kernel"] == "cudnn" and att["reason"] is None
        assert att["evidence"] == {"__cudnn$fmhaSoftmax": L, "__cudnn$fmhaSoftmaxBackward": L}
    else:
        assert att["kernel"] == "pallas" and att["reason"] is None
        assert att["evidence"] == {"tpu_custom_call": 3 * L}  # forward, dK/dV, dQ
    mem = train["memory"]
    assert mem["fits"] and 0 < mem["peak"] < gpt2_plan["chip_memory"]
    assert train["flops"]["analytic_per_token"] > 6 * 85e6  # 6N with N ~ 124M - wpe
    assert train["roofline"]["tokens_per_s"] > 0 and 0 < train["roofline"]["mfu"] <= 1


def test_gpt2_data_parallel_step_all_reduces_its_gradients(gpt2_plan):
    coll = gpt2_plan["train"]["collectives"]
    if gpt2_plan["chips"] == 1:
        assert coll == {}
    else:  # the gradients (~124M; in bfloat16 where XLA reduces them before the cast) are
        # all-reduced over the data axis
        assert coll["all-reduce"]["bytes"] >= 2 * 0.9 * gpt2_plan["parameters"]


@pytest.mark.parametrize("target", ["h100x8", "v5e-4"])
def test_fsdp_splits_the_state_and_gathers_parameters(target):
    _require(target)
    n = parse_target(target).chips
    dp = _plan(TINY, target, rows=1, mesh=MeshConfig(data=n))["train"]
    fsdp = _plan(TINY, target, rows=1, mesh=MeshConfig(data=1, fsdp=n))["train"]
    assert "all-gather" in fsdp["collectives"] and "all-gather" not in dp["collectives"]
    assert "all-reduce" in dp["collectives"]
    for part in ("parameters", "optimizer"):  # ~1/N: a few small leaves (scalars) stay whole
        ratio = fsdp["memory"][part] / dp["memory"][part]
        assert 1 / n <= ratio < 1.25 / n, (part, ratio)


@pytest.mark.parametrize("target", ["h100", "v5e-1"])
def test_reference_kernels_leave_no_fused_attention(target):
    _require(target)
    train = _plan(TINY.replace(kernels="reference"), target, rows=2)["train"]
    assert train["attention"]["kernel"] == "reference" and train["attention"]["evidence"] == {}
    assert not any(k.startswith(("__cudnn$fmha", "tpu_custom_call")) for k in train["custom_calls"])


@pytest.mark.parametrize("target", ["h100", "v5e-1"])
def test_decode_step_is_planned_for_the_chip(target):
    _require(target)
    dec = _plan(TINY, target, rows=1, decode=4)["decode"]
    # The cache (donated, updated in place) and float32 parameters are arguments, not copies.
    assert dec["memory"]["aliased"] >= dec["cache_bytes"]
    assert dec["memory"]["temporaries"] < 2 * dec["cache_bytes"] + 4 * (1 << 20)


def test_bad_targets_are_refused_in_one_line():
    for bad, word in [("h300", "unknown --target"), ("v5e-3", "power of two"),
                      ("v4-7", "TensorCores"), ("v5e:2x2x2", "2 dimensions")]:
        with pytest.raises(ValueError, match=word):
            parse_target(bad)


def test_a_mesh_or_batch_that_cannot_split_is_refused_before_compiling():
    with pytest.raises(ValueError, match="does not fit the target's 8 chips"):
        planner.check_shape(planner.Shape(64, 1, MeshConfig(data=3), "none"), 8)
    with pytest.raises(ValueError, match="does not split over 8"):
        planner.check_shape(planner.Shape(12, 1, MeshConfig(), "none"), 8)
