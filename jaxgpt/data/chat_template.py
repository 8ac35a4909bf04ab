"""Chat templates: a model directory's Jinja template rendered as transformers renders it.

Templates come with downloaded models, so they are untrusted code: they run in jinja2's
immutable sandbox, with the environment transformers' `apply_chat_template` gives them
(trim_blocks, lstrip_blocks, loop controls, a `tojson` that does not escape HTML,
`raise_exception`, `strftime_now`), so a prompt rendered here tokenizes to the same ids.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise ValueError(f"chat template line {err.lineno}: {err.message}") from None


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                **variables) -> str:
    """The text of `messages` ([{"role", "content"}, ...]) in `template`; `variables` are what
    the template may read besides (bos_token, eos_token, tools, ...)."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"message {i} is not a dict with a 'role': {m!r}")
    try:
        return _compile(template).render(messages=messages,
                                         add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as err:
        raise ValueError(f"chat template: {err}") from None
