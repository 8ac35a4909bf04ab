"""The sharding report: one row per parameter, totals, and the compiled step's memory."""

import jax
import pytest

from jaxgpt import GPTConfig, count_params
from jaxgpt.models.model import init_params
from jaxgpt.sharding import make_mesh
from jaxgpt.training.report import ReportOptions, sharding_report
from jaxgpt.training.runconfig import MeshConfig
from tests.conftest import TINY


@pytest.fixture(scope="module")
def report():
    cfg = GPTConfig(**TINY)
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    return cfg, sharding_report(cfg, mesh, options=ReportOptions(batch_size=6, accum_steps=2, table=True))


def test_every_parameter_has_a_row(report):
    cfg, text = report
    params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    paths = ["/".join(str(k.key) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    rows = {line.split()[0]: line for line in text.splitlines()}
    for path in paths:
        assert path in rows, path
    assert "(vocab, embed)" in rows["wte/embedding"] and "17x12" in rows["wte/embedding"]
    # The rows are in reading order: h_2 would come before h_10.
    order = [line.split()[0] for line in text.splitlines() if line.startswith("h_")]
    assert order.index("h_0/attn/key/kernel") < order.index("h_1/attn/key/kernel")


def test_totals_and_memory(report):
    cfg, text = report
    n = count_params(jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0)))
    assert f"parameters: {n:,} = " in text
    assert "optimizer state:" in text
    assert "(batch 6 x 11 tokens, 2 micro-batch(es))" in text and "peak about" in text
    assert text.startswith("sharding report: mesh data=1 fsdp=1 tensor=1 (1 devices")


def test_one_device_shows_the_totals_only_unless_asked():
    cfg = GPTConfig(**TINY)
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    text = sharding_report(cfg, mesh, options=ReportOptions(batch_size=6, accum_steps=2))
    lines = text.splitlines()
    assert not any(line.startswith(("h_0/", "wte/")) for line in lines)
    assert lines[0].startswith("sharding report: mesh data=1") and len(lines) <= 6
    assert any(line.startswith("parameters: ") for line in lines)
