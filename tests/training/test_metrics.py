"""metrics.jsonl survives a run killed mid-write: readers drop the partial last line."""

import json

import pytest

from jaxgpt.training.metrics import MetricsLog, plot_losses, read_metrics

EVAL = {"kind": "eval", "step": 1, "tokens_seen": 7, "train_loss": 2.5, "val_loss": 2.75,
        "train_accuracy": 0.5, "val_accuracy": 0.25}


def _killed_mid_write(path):
    path.write_text(json.dumps(EVAL) + "\n" + json.dumps({**EVAL, "step": 3})[:17])


def test_readers_drop_a_partial_last_line(tmp_path):
    from jaxgpt.tasks.classification.finetune import plot_curves

    path = tmp_path / "metrics.jsonl"
    _killed_mid_write(path)
    assert read_metrics(path) == [EVAL]
    assert plot_losses(path, tmp_path / "loss.png").is_file()
    assert [p.name for p in plot_curves(tmp_path, 1)] == ["loss.png", "accuracy.png"]


def test_garbage_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(EVAL) + "\n{oops\n" + json.dumps(EVAL) + "\n")
    with pytest.raises(ValueError, match=rf"^{path} line 2 is not a JSON record"):
        read_metrics(path)
    path.write_text(json.dumps(EVAL) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match="line 2 is not a JSON object"):
        read_metrics(path)


def test_a_resumed_log_cuts_the_partial_line_once_and_appends_whole_lines(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    _killed_mid_write(path)
    log = MetricsLog(tmp_path, enabled=True, tensorboard=False)
    log.truncate_after(1)
    log.write({"kind": "train", "step": 2, "loss": 1.5})
    assert read_metrics(path) == [EVAL, {"kind": "train", "step": 2, "loss": 1.5}]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: dropped a partial last line (line 2" in err
    # A whole record that lost only its newline is kept, and the next one gets a line of its own.
    path.write_text(json.dumps(EVAL))
    MetricsLog(tmp_path, enabled=True, tensorboard=False).write({"kind": "train", "step": 2})
    assert read_metrics(path) == [EVAL, {"kind": "train", "step": 2}]
    assert capsys.readouterr().err == ""
