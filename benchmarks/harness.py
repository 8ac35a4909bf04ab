"""lm-evaluation-harness throughput: the `jaxgpt` model against the harness's own `hf` model on
the same weights, same process, same requests.

A random GPT-2-shaped model is exported (safetensors, with GPT-2's tokenizer files) and loaded
by both; the requests are a HellaSwag-like slice (a context of a few sentences, four endings
each) asked through `loglikelihood`, as the multiple-choice tasks ask. Each model answers the
whole slice once untimed (compiles, warm-up), then the two take turns `--repeats` times; the best
round counts. The log-likelihoods of the two are compared too (they should agree to ~1e-4).

    python benchmarks/harness.py            # 4 layers, width 256, context 256; 64 examples
    python benchmarks/harness.py --quick    # a tiny model, 8 examples, seconds
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import hardware, interleaved_best  # noqa: E402  (benchmarks/common.py)

from jaxgpt.config import GPTConfig  # noqa: E402
from jaxgpt.data.tokenizer import bpe_files  # noqa: E402
from jaxgpt.models.model import init_params  # noqa: E402
from jaxgpt.weights.huggingface import save_pretrained  # noqa: E402

WORDS = ("the a man woman dog cat walks runs into kitchen garden opens closes door window "
         "slowly quickly then and after before picks up puts down ball book cup").split()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model and 8 examples")
    p.add_argument("--examples", type=int, default=None, help="HellaSwag-like examples (4 endings each)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass, both models")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def slice_of_requests(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(context, " " + ending) for n examples of 4 endings: contexts of 20-60 words."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        context = " ".join(rng.choice(WORDS, int(rng.integers(20, 60)))).capitalize() + "."
        for _ in range(4):
            pairs.append((context, " " + " ".join(rng.choice(WORDS, int(rng.integers(3, 15))))))
    return pairs


def export(config: GPTConfig, folder: Path) -> Path:
    save_pretrained(config, init_params(config, jax.random.key(0)), folder)
    files = bpe_files()  # GPT-2's tokenizer, for transformers' loader
    shutil.copy(files["encoder.json"], folder / "vocab.json")
    shutil.copy(files["vocab.bpe"], folder / "merges.txt")
    return folder


def main(argv=None) -> int:
    args = parse_args(argv)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from jaxgpt.tasks.harness.lm import JaxgptLM

    if args.quick:
        config = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2,
                           drop_rate=0.0, dtype="float32")
    else:
        config = GPTConfig(vocab_size=50257, context_length=256, emb_dim=256, n_heads=4, n_layers=4,
                           drop_rate=0.0, dtype="float32")
    n = args.examples or (8 if args.quick else 64)
    pairs = slice_of_requests(n)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    print(hardware())
    print(f"model: {config.n_layers} layers, width {config.emb_dim}, context {config.context_length}, "
          f"float32; {n} examples = {len(pairs)} loglikelihood requests; batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(config, Path(tmp) / "model")
        ours = JaxgptLM(str(folder), batch_size=args.batch_size, progress=False)
        theirs = HFLM(pretrained=str(folder), batch_size=args.batch_size, dtype="float32", device="cpu")
        answers = {}

        def run(name, lm):
            return lambda: answers.__setitem__(name, lm.loglikelihood(requests, disable_tqdm=True))

        best = interleaved_best({"jaxgpt": run("jaxgpt", ours), "hf": run("hf", theirs)}, args.repeats)
    gap = max(abs(a[0] - b[0]) for a, b in zip(answers["jaxgpt"], answers["hf"]))
    for name, seconds in best.items():
        print(f"{name:>7}: {len(pairs) / seconds:8.1f} requests/s  ({seconds:.2f} s for the slice)")
    print(f"jaxgpt / hf: {best['hf'] / best['jaxgpt']:.2f}x the requests per second; "
          f"largest log-likelihood difference {gap:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
