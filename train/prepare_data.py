"""Tokenize a corpus into uint16 token shards for pretraining (see jaxgpt/data/prepare.py).

    python train/prepare_data.py SOURCE OUT_DIR [--shard-tokens N] [--val-tokens N] ...

SOURCE is a text file, a directory (its *.txt, *.jsonl, *.parquet files), a glob, or
hf:<dataset>[:<config>] (streamed). Rerunning the same command after an interruption resumes;
train with `data.shards=OUT_DIR`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from jaxgpt.entrypoint import USER_ERRORS, fail  # noqa: E402
from jaxgpt.data.prepare import PrepareOptions, prepare  # noqa: E402
from jaxgpt.data.sources import SourceSpec  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="+", help="file, directory, glob or hf:<dataset>[:<config>]")
    parser.add_argument("out_dir", help="directory for the shards and manifest.json")
    parser.add_argument("--text-column", default="text", help="column of JSONL/Parquet/dataset rows")
    parser.add_argument("--split", default="train", help="split of an hf: dataset")
    parser.add_argument("--data-files", nargs="*", default=None, help="data_files of an hf: dataset")
    parser.add_argument("--shard-tokens", type=int, default=PrepareOptions.shard_tokens)
    parser.add_argument("--val-tokens", type=int, default=PrepareOptions.val_tokens,
                        help="the validation shard ends at the first document end after this many tokens, "
                             "or right there when none comes within --shard-tokens more (one long document)")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    args = parser.parse_args(argv)
    try:
        source = args.source[0] if len(args.source) == 1 else tuple(args.source)
        spec = SourceSpec(source, text_column=args.text_column, split=args.split,
                          data_files=tuple(args.data_files) if args.data_files else None)
        opts = PrepareOptions(shard_tokens=args.shard_tokens, val_tokens=args.val_tokens,
                              workers=args.workers)
        prepare(spec, args.out_dir, opts)
    except USER_ERRORS as e:
        return fail(e, 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
