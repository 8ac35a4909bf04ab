"""The model a chat or a server answers with, and the prompt format it answers in."""

from __future__ import annotations

from jaxgpt.weights.loader import is_run_dir, load_model, read_run_yaml, task_section


def chat_template(name_or_dir: str, template: str | None = None) -> str:
    """The prompt format's name: `template`, else the instruction or preference run's
    (config.yaml's instruct.template or preference.template), else alpaca."""
    if template is None and is_run_dir(name_or_dir):
        template = task_section(read_run_yaml(name_or_dir)).get("template")
    return template or "alpaca"


def load_chat_model(name_or_dir: str, template: str | None = None):
    """(config, params, template name): the model from `load_model` and its `chat_template`."""
    config, params = load_model(name_or_dir)
    return config, params, chat_template(name_or_dir, template)
