"""Command line text generation, streaming tokens to stdout as they are decoded.

  python -m jaxgpt.cli.generate --model gpt2 --prompt "Every effort moves you"

It samples as the book's chapter 5 does (temperature 0.8, top-k 40; --seed fixes the draw);
--temperature 0 decodes greedily. --model is anything `jaxgpt.load_model` takes: a GPT-2 name (gpt2, gpt2-medium, gpt2-large,
gpt2-xl), a directory holding config.json and model.safetensors, or a jaxgpt run directory.
"""

from __future__ import annotations

import argparse
import codecs
import itertools
import sys

import jax

from jaxgpt.cli.common import USER_ERRORS, fail, setup_process
from jaxgpt.generation import generate_stream
from jaxgpt.generation_inputs import check_sampling, check_size
from jaxgpt.loading import load_model

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
                   help="stop at <|endoftext|>")
    return p.parse_args(argv)


def main(argv=None) -> int:
    setup_process()  # this process's settings (jaxgpt/cli/common.py), before any JAX computation
    args = parse_args(argv)
    from jaxgpt.tokenizer import get_tokenizer

    tokenizer = get_tokenizer("gpt2")
    ids = tokenizer.encode(args.prompt, allowed_special={"<|endoftext|>"})
    try:
        # Options first: a request no model could take is refused before the weights load.
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
        check_size(1, len(ids), args.max_new_tokens)
        config, params = load_model(args.model)
    except USER_ERRORS as err:  # a bad option, path or checkpoint: one line
        return fail(err, 1)
    eot = tokenizer.eot_token if args.stop_at_eot and tokenizer.eot_token < config.vocab_size else None
    top_k = args.top_k
    if top_k is None and args.temperature > 0:  # the book's chapter 5 sampling: temperature, top-k
        top_k = min(DEFAULT_TOP_K, config.vocab_size)
    stream = generate_stream(
        params, config, [ids], args.max_new_tokens, temperature=args.temperature, top_k=top_k,
        top_p=args.top_p, eos_id=eot, key=jax.random.key(args.seed), chunk_size=1,
    )
    # A token can end inside a UTF-8 character; the incremental decoder waits for the rest.
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        first = next(stream, None)  # options and prompt are checked before anything is printed
    except ValueError as err:  # options or prompt the model cannot take
        return fail(err, 1)
    sys.stdout.write(args.prompt)  # with --max-new-tokens 0, all there is
    for chunk in itertools.chain([] if first is None else [first], stream):
        for token in chunk[0].tolist():
            if token == eot:
                break
            # A model vocabulary padded past the tokenizer's has ids with no text.
            piece = tokenizer.decode_single_token_bytes(token) if token < tokenizer.n_vocab else b""
            sys.stdout.write(text.decode(piece))
        sys.stdout.flush()
    sys.stdout.write(text.decode(b"", final=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
