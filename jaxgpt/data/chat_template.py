"""Chat templates: a model directory's Jinja template rendered as transformers renders it.

Templates come with downloaded models, so they are untrusted code: they run in jinja2's
immutable sandbox, with the environment transformers' `apply_chat_template` gives them, so a
prompt rendered here is the same text and tokenizes to the same ids: trim_blocks, lstrip_blocks,
loop controls, a `tojson` that does not escape HTML, `raise_exception`, `strftime_now`, a `dict`
constructor, a `namespace` that refuses underscore names, the `{% generation %}` block of
templates written for assistant-only losses (rendered as its body), `tools` and `documents`
always defined (None unless given), and a message's reasoning under each of the names templates
read it by (reasoning_content, thinking).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Where a message's reasoning may be given; the first two are the names templates read.
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks the assistant's part for a masked loss;
    rendered here as its body alone."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` in a template, and nothing else of the type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace without underscore-prefixed attributes (no way to CPython internals)."""

    def __init__(*args, **kwargs):  # noqa: N805  (jinja2's own signature: `self` may be a key)
        self, rest = args[0], args[1:]
        values = dict(*rest, **kwargs)
        for name in values:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, values)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template may not set an underscore-prefixed namespace attribute: {name!r}")


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, dict=_Dict(), namespace=_Namespace,
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
    variables = {"tools": None, "documents": None, **variables}
    try:
        return _compile(template).render(messages=[_with_reasoning(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as err:
        raise ValueError(f"chat template: {err}") from None


def _with_reasoning(message: dict) -> dict:
    """The message with its reasoning, if it has any, under every name templates read."""
    reasoning = next((message[k] for k in REASONING_KEYS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}
