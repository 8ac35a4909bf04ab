"""load_model: every source gives the logits of the params it was made from; refusals are one line."""

import importlib
import shutil

import jax
import numpy as np
import pytest

from jaxgpt.lora import transform as lora
from jaxgpt.config import GPTConfig
from jaxgpt.weights.loader import load_model
from jaxgpt.models.model import GPT, init_params
from jaxgpt.weights.huggingface import load_pretrained, save_pretrained
from jaxgpt.weights.runs import CheckpointError
from jaxgpt.sharding import MeshConfig, make_mesh
from jaxgpt.tasks.classification.model import ClassifierRunConfig, init_head, with_head
from jaxgpt.tasks.instruct.finetune import InstructConfig, InstructRunConfig
from jaxgpt.training.runconfig import RunConfig
from tests.conftest import TINY, write_run

CONFIG = GPTConfig(**TINY)
IDS = np.array([[3, 16, 0, 9, 5, 12, 1], [7, 7, 2, 11, 4, 15, 8]])  # [B=2, T=7]


def logits(config, params):
    return np.asarray(GPT(config).apply({"params": params}, IDS, True))


def assert_same_logits(loaded, config, params):
    got_config, got = loaded
    np.testing.assert_allclose(logits(got_config, got), logits(config, params), rtol=1e-6, atol=1e-6)


def listing(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(3))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, params):
    return save_pretrained(CONFIG, params, tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def pretraining_run(tmp_path_factory, params):
    other = init_params(CONFIG, jax.random.key(4))
    run = tmp_path_factory.mktemp("runs") / "pre"
    return write_run(run, RunConfig(model=CONFIG), {1: other, 2: params})


def test_hugging_face_directory(hf_dir, params):
    assert_same_logits(load_model(hf_dir, dtype="float32"), CONFIG, params)
    # Hub and HF sources take any load_pretrained override, layout ones included.
    config, scanned = load_model(hf_dir, scan_layers=True, dtype="float32")
    assert config.scan_layers and scanned["h"]["attn"]["query"]["kernel"].shape[0] == CONFIG.n_layers
    assert_same_logits((config, scanned), CONFIG, params)


def test_pretraining_run_latest_step_and_a_chosen_one(pretraining_run, params):
    config, got = load_model(pretraining_run)
    assert config == CONFIG
    jax.tree.map(np.testing.assert_array_equal, got, params)
    _, first = load_model(pretraining_run, step=1)
    jax.tree.map(np.testing.assert_array_equal, first, init_params(CONFIG, jax.random.key(4)))
    config, _ = load_model(pretraining_run, drop_rate=0.25, remat_policy="full")  # runtime fields
    assert config == CONFIG.replace(drop_rate=0.25, remat_policy="full")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint 5 \(it has \[1, 2\]\)"):
        load_model(pretraining_run, step=5)


def test_pretraining_run_onto_a_mesh(pretraining_run, params):
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    config, got = load_model(pretraining_run, mesh=mesh)
    assert all(isinstance(x.sharding, jax.sharding.NamedSharding) for x in jax.tree.leaves(got))
    assert_same_logits((config, jax.device_get(got)), CONFIG, params)


def test_finished_instruction_run_gives_its_export(tmp_path, params):
    from jaxgpt.inference.loading import load_chat_model

    exported = init_params(CONFIG, jax.random.key(5))
    run = write_run(tmp_path / "sft", InstructRunConfig(model=CONFIG, instruct=InstructConfig(
        template="phi3")), {3: params})
    save_pretrained(CONFIG, exported, run / "model")
    want_config, want = load_pretrained(run / "model")
    assert_same_logits(load_model(run), want_config, want)
    assert_same_logits(load_model(run, step=3), CONFIG, params)  # a step names a checkpoint
    config, got, template = load_chat_model(str(run))
    assert template == "phi3" and load_chat_model(str(run), "alpaca")[2] == "alpaca"
    assert_same_logits((config, got), want_config, want)


def test_unfinished_lora_run_merges_its_adapters_into_its_base(tmp_path, hf_dir):
    # The run's model is its base's config, as instruction tuning records it.
    config, base = load_pretrained(hf_dir, dtype="float32")
    lcfg = lora.LoRAConfig(rank=2, alpha=3.0)
    trainable, frozen = lora.partition(base, lcfg, jax.random.key(0))
    # B starts at zero, which would make merging a no-op; trained adapters are not.
    trainable = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape),
                             trainable)
    run_cfg = InstructRunConfig(model=config, instruct=InstructConfig(init_from=str(hf_dir)),
                                lora=lcfg)
    run = write_run(tmp_path / "lora", run_cfg, {2: trainable})
    before = listing(run)
    got_config, got = load_model(run)
    assert got_config == config
    expected = lora.combine(trainable, frozen, lcfg)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, expected)
    assert_same_logits((got_config, got), config, expected)
    assert listing(run) == before

    for i, base_source in enumerate([tmp_path / "gone", "scratch"]):
        orphan = write_run(tmp_path / f"orphan{i}", InstructRunConfig(
            model=config, instruct=InstructConfig(init_from=str(base_source)), lora=lcfg),
            {2: trainable})
        with pytest.raises(CheckpointError, match=f"is a LoRA run whose base '{base_source}' could "
                                                  "not be loaded") as err:
            load_model(orphan)
        assert "\n" not in str(err.value)

    # A run whose base is itself (or a chain back to it) is refused, not recursed into.
    loop = write_run(tmp_path / "loop", InstructRunConfig(
        model=config, instruct=InstructConfig(init_from=str(tmp_path / "loop")), lora=lcfg),
        {2: trainable})
    with pytest.raises(CheckpointError, match="leads back to itself") as err:
        load_model(loop)
    assert "\n" not in str(err.value)


def test_classifier_run_is_refused_and_a_language_model_is_not_a_classifier(tmp_path, params,
                                                                              pretraining_run):
    from jaxgpt import load_classifier

    with_cls = with_head(params, init_head(jax.random.key(2), CONFIG.emb_dim, 3))
    run = write_run(tmp_path / "cls", ClassifierRunConfig(model=CONFIG), {1: with_cls})
    with pytest.raises(CheckpointError, match="is a classifier run .* jaxgpt.load_classifier"):
        load_model(run)
    # Known by its head too, whatever its config.yaml says.
    shutil.copy(pretraining_run / "config.yaml", run / "config.yaml")
    with pytest.raises(CheckpointError, match="is a classifier run .* jaxgpt.load_classifier"):
        load_model(run)
    with pytest.raises(CheckpointError, match="is not a classifier run") as err:
        load_classifier(pretraining_run)
    assert "classifier." not in str(err.value) and "\n" not in str(err.value)


def test_classify_cli_on_a_pretraining_run_is_one_line(pretraining_run, capsys):
    classify_cli = importlib.import_module("jaxgpt.cli.classify")
    assert classify_cli.main(["--model", str(pretraining_run), "some text"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a classifier run" in err


def test_bad_sources_name_the_path_or_the_field(tmp_path, pretraining_run):
    with pytest.raises(ValueError, match=r"cannot override emb_dim .*pre: its weights fix it"):
        load_model(pretraining_run, emb_dim=24)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_model(tmp_path / "nowhere")
    (tmp_path / "half" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"half is not a run directory \(no config.yaml\)"):
        load_model(tmp_path / "half")


def test_reading_leaves_a_partial_step_alone(tmp_path, pretraining_run, params):
    run = tmp_path / "pre"
    shutil.copytree(pretraining_run, run)
    newer = init_params(CONFIG, jax.random.key(6))
    write_run(run, RunConfig(model=CONFIG), {3: newer})
    (run / "checkpoints" / "3" / "commit_success.txt").unlink()  # a write cut short
    before = listing(run)
    _, got = load_model(run)
    jax.tree.map(np.testing.assert_array_equal, got, params)  # step 2, the latest complete one
    assert listing(run) == before


def test_finetuning_starts_take_runtime_fields_and_hf_layout(hf_dir, pretraining_run, params):
    from jaxgpt.tasks.instruct.finetune import load_start

    wanted = CONFIG.replace(scan_layers=True, drop_rate=0.3, remat_policy="dots")
    config, got = load_start(str(hf_dir), wanted)
    assert (config.scan_layers, config.drop_rate, config.remat_policy) == (True, 0.3, "dots")
    assert_same_logits((config, got), CONFIG, params)
    # A run directory fixes its layout; only the runtime fields change.
    config, got = load_start(str(pretraining_run), wanted)
    assert config == CONFIG.replace(drop_rate=0.3, remat_policy="dots")
    jax.tree.map(np.testing.assert_array_equal, got, params)
    assert load_start("scratch", wanted) == (wanted, None)
