"""Talk to an instruction-tuned model: each line on stdin is an instruction, answered in turn.

  python -m jaxgpt.cli.chat --model RUN_DIR

--model is a `train/finetune_instruct.py` run directory (its template is used unless --template
names one), or anything else `jaxgpt.load_model` takes (then --template picks the prompt format,
alpaca by default). A line "exit", or the end of input, ends the session.

A Llama 3 / Qwen3 directory with a tokenizer.json is a conversation instead: every turn so far is
rendered by the model's own chat template, and a reply ends at the family's end-of-turn tokens.
"""

from __future__ import annotations

import argparse
import sys

import jax

from jaxgpt.data.prompts import TEMPLATES
from jaxgpt.data.tokenizer import FamilyTokenizer, model_tokenizer
from jaxgpt.entrypoint import USER_ERRORS, fail, setup_process
from jaxgpt.inference.generate import generate
from jaxgpt.inference.loading import chat_template
from jaxgpt.inference.requests import check_request, check_size
from jaxgpt.inference.sampling import Sampling
from jaxgpt.tasks.instruct import responses
from jaxgpt.weights.loader import load_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxgpt.cli.chat", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="an instruction run dir, gpt2[-medium...] or a dir")
    p.add_argument("--template", choices=sorted(TEMPLATES), default=None,
                   help="prompt format (default: the run's, else alpaca)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    setup_process()  # this process's settings (jaxgpt/entrypoint.py), before any JAX computation
    args = parse_args(argv)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    try:
        # Options first: a request no model could take is refused before the weights load.
        check_request(args.max_new_tokens, sampling, name="--max-new-tokens")
        check_size(1, 1, args.max_new_tokens)
        config, params = load_model(args.model)
        template = chat_template(args.model, args.template)
        tok, stop_ids = model_tokenizer(args.model, config)
    except USER_ERRORS as err:  # a bad option, path or checkpoint: one line
        return fail(err, 1)
    interactive = sys.stdin.isatty()
    key = jax.random.key(args.seed)
    if isinstance(tok, FamilyTokenizer) and args.template is None:  # its own chat template
        return _converse(config, params, tok, stop_ids, args, interactive, key, sampling)
    # A family model with --template: that text format, read by the model's own tokenizer.
    family = {} if not isinstance(tok, FamilyTokenizer) else \
        {"tokenizer": tok, **({"eos_id": stop_ids} if stop_ids else {})}
    for turn, line in enumerate(iter(lambda: _read(interactive), None)):
        instruction = line.strip()
        if instruction == "exit":
            break
        if not instruction:
            continue
        try:
            [reply] = responses.generate_responses(
                params, config, [{"instruction": instruction, "input": "", "output": ""}], template,
                max_new_tokens=args.max_new_tokens, batch_size=1, sampling=sampling,
                key=jax.random.fold_in(key, turn), **family)
        except ValueError as err:  # options the model cannot take
            return fail(err, 1)
        print(reply["model_response"], flush=True)
    return 0


def _converse(config, params, tok, stop_ids, args, interactive: bool, key, sampling) -> int:
    """A multi-turn chat in the model's own template; replies stop at its end-of-turn ids."""
    try:
        tok.render_chat([{"role": "user", "content": ""}])  # no template: refused before a turn
    except USER_ERRORS as err:
        return fail(err, 1)
    messages: list[dict] = []
    for turn, line in enumerate(iter(lambda: _read(interactive), None)):
        text = line.strip()
        if text == "exit":
            break
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        try:
            ids = tok.encode_chat(messages)
            new = generate(params, config, [ids], args.max_new_tokens, sampling=sampling,
                           eos_id=stop_ids or None, key=jax.random.fold_in(key, turn)
                           )[0, len(ids):].tolist()
        except ValueError as err:  # options the model cannot take, a prompt past its context
            return fail(err, 1)
        ends = [i for i, t in enumerate(new) if t in stop_ids]
        reply = tok.decode(new[:ends[0]] if ends else new, skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
    return 0


def _read(interactive: bool) -> str | None:
    """The next line of input, or None at its end."""
    if interactive:
        print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    return line if line else None


if __name__ == "__main__":
    sys.exit(main())
