"""Command line text generation, streaming tokens to stdout as they are decoded.

  python -m jaxgpt.cli.generate --model gpt2 --prompt "Every effort moves you"

It samples as the book's chapter 5 does (temperature 0.8, top-k 40; --seed fixes the draw);
--temperature 0 decodes greedily. --model is anything `jaxgpt.load_model` takes: a GPT-2 name (gpt2, gpt2-medium, gpt2-large,
gpt2-xl), a directory holding config.json and model.safetensors, or a jaxgpt run directory.
A Llama 3 / Qwen3 directory with a tokenizer.json is read with that tokenizer (the prompt gets
its BOS, as transformers' tokenizer gives it) and stops at any of its end-of-text/turn ids.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import jax

from jaxgpt.data.tokenizer import TextDecoder, model_tokenizer
from jaxgpt.entrypoint import USER_ERRORS, fail, setup_process
from jaxgpt.inference.generate import generate_stream
from jaxgpt.inference.requests import check_request, check_size
from jaxgpt.inference.sampling import Sampling
from jaxgpt.weights.loader import load_model

DEFAULT_TOP_K = 40


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxgpt.cli.generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="gpt2[-medium|-large|-xl], an export dir or a run dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.8, help="0 decodes greedily")
    p.add_argument("--top-k", type=int, default=None,
                   help=f"keep the k most likely tokens (default {DEFAULT_TOP_K} when sampling)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-at-eot", action=argparse.BooleanOptionalAction, default=True,
                   help="stop at <|endoftext|> (a Llama/Qwen3 model: any of its end-of-text/turn ids)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    setup_process()  # this process's settings (jaxgpt/entrypoint.py), before any JAX computation
    args = parse_args(argv)
    try:
        # Options first: a request no model could take is refused before the weights load.
        check_request(args.max_new_tokens, Sampling(args.temperature, args.top_k, args.top_p),
                      least=0, name="max_new_tokens")
        check_size(1, 1, args.max_new_tokens)
        config, params = load_model(args.model)
        tokenizer, stop_ids = model_tokenizer(args.model, config)
    except USER_ERRORS as err:  # a bad option, path or checkpoint: one line
        return fail(err, 1)
    if hasattr(tokenizer, "encode_text"):  # a family's own tokenizer: its BOS, as transformers
        ids = tokenizer.encode_text(args.prompt)
    else:
        ids = tokenizer.encode(args.prompt, allowed_special={"<|endoftext|>"})
    try:
        check_size(1, len(ids), args.max_new_tokens)
    except ValueError as err:
        return fail(err, 1)
    stops = stop_ids if args.stop_at_eot else ()
    top_k = args.top_k
    if top_k is None and args.temperature > 0:  # the book's chapter 5 sampling: temperature, top-k
        top_k = min(DEFAULT_TOP_K, config.vocab_size)
    sampling = Sampling(args.temperature, top_k, args.top_p)
    stream = generate_stream(params, config, [ids], args.max_new_tokens, sampling=sampling,
                             eos_id=stops or None, key=jax.random.key(args.seed), chunk_size=1)
    # A token can end inside a UTF-8 character; the decoder waits for the rest.
    text = TextDecoder(tokenizer)
    try:
        first = next(stream, None)  # options and prompt are checked before anything is printed
    except ValueError as err:  # options or prompt the model cannot take
        return fail(err, 1)
    sys.stdout.write(args.prompt)  # with --max-new-tokens 0, all there is
    done = False
    for chunk in itertools.chain([] if first is None else [first], stream):
        for token in chunk[0].tolist():
            if done or token in stops:
                done = True
                break
            sys.stdout.write(text.feed(token))
        sys.stdout.flush()
    sys.stdout.write(text.flush() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
