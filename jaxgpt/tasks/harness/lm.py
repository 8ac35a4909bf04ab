"""Any jaxgpt model as an lm-evaluation-harness model, registered as `jaxgpt`.

  lm_eval.simple_evaluate(model="jaxgpt", model_args="pretrained=runs/ch05,batch_size=16", ...)

`pretrained` is anything `jaxgpt.load_model` takes (a GPT-2 name, a Hugging Face directory of any
family, a jaxgpt run directory, LoRA runs included) with `step`, `dtype` (the compute dtype) and a
mesh (`data`, `fsdp`, `tensor`: the weights are split over it). Text is tokenized as the harness's
`hf` model tokenizes it (GPT-2's BPE, or the directory's tokenizer.json with its BOS), so the
numbers compare with `hf` on the exported weights. `loglikelihood` and `loglikelihood_rolling`
score through `scoring.py`; `generate_until` decodes through the continuous-batching engine
(`batch_size` slots) and cuts the text at the first of the request's `until` strings.
"""

from __future__ import annotations

import threading

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm.auto import tqdm

from jaxgpt.data.tokenizer import TextDecoder, model_tokenizer
from jaxgpt.inference.engine import Engine, Request, run_to_end
from jaxgpt.sharding import MeshConfig, make_mesh
from jaxgpt.tasks.harness.scoring import loglikelihoods, rolling_windows
from jaxgpt.weights.loader import load_model


def _count(value, name: str, least: int = 1) -> int:
    """An lm-eval model argument that must be an integer (it may arrive as a string)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if number < least or str(number) != str(value).strip():
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return number


@register_model("jaxgpt")
class JaxgptLM(TemplateLM):
    """A jaxgpt model for the harness (see the module docstring for its arguments)."""

    def __init__(self, pretrained: str, step=None, dtype: str | None = None, batch_size=16,
                 max_length=None, data=1, fsdp=1, tensor=1, max_gen_toks=256, seed=0,
                 progress: bool = True, **unused):
        super().__init__()
        unused.pop("device", None)  # the harness passes its torch device; JAX places arrays
        unused.pop("max_batch_size", None)
        if unused:
            raise ValueError(f"the jaxgpt model takes no argument {sorted(unused)[0]!r}")
        self.batch_size = 16 if str(batch_size).startswith("auto") else _count(batch_size, "batch_size")
        self.max_gen_toks = _count(max_gen_toks, "max_gen_toks")
        self.seed = _count(seed, "seed", 0)
        shape = MeshConfig(data=_count(data, "data"), fsdp=_count(fsdp, "fsdp"), tensor=_count(tensor, "tensor"))
        mesh = make_mesh(shape) if shape.data * shape.fsdp * shape.tensor > 1 else None
        overrides = {} if dtype is None else {"dtype": dtype}
        step = None if step is None else _count(step, "step", 0)
        config, params = load_model(pretrained, step=step, mesh=mesh, **overrides)
        self._setup(config, params, *model_tokenizer(pretrained, config), max_length=max_length)
        self.progress = str(progress).lower() not in ("0", "false", "no")

    @classmethod
    def from_params(cls, config, params, tokenizer, stop_ids: tuple[int, ...], *, batch_size: int = 16,
                    max_length=None, progress: bool = False) -> "JaxgptLM":
        """The model in hand (a training run's parameters) with its tokenizer and stop ids."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm.batch_size, lm.max_gen_toks, lm.seed, lm.progress = _count(batch_size, "batch_size"), 256, 0, progress
        lm._setup(config, params, tokenizer, stop_ids, max_length=max_length)
        return lm

    def _setup(self, config, params, tokenizer, stop_ids, *, max_length) -> None:
        self.config, self.params = config, params
        self.tokenizer_, self.stop_ids = tokenizer, tuple(stop_ids)
        self._max_length = config.context_length if max_length is None else _count(max_length, "max_length")
        if self._max_length > config.context_length:
            raise ValueError(f"max_length {self._max_length} is longer than the model's context "
                             f"of {config.context_length}")
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()

    # --- tokens ---

    @property
    def family_tokenizer(self) -> bool:
        return hasattr(self.tokenizer_, "encode_text")

    @property
    def eot_token_id(self) -> int:
        if self.family_tokenizer:
            eos = self.tokenizer_.special.get("eos_token")
            found = None if eos is None else self.tokenizer_.tokenizer.token_to_id(eos)
            return found if found is not None else self.stop_ids[0]
        return self.tokenizer_.eot_token

    @property
    def prefix_token_id(self) -> int:
        if self.family_tokenizer:  # the harness's hf model: BOS where there is one, else EOS
            bos = self.tokenizer_.special.get("bos_token")
            found = None if bos is None else self.tokenizer_.tokenizer.token_to_id(bos)
            return found if found is not None else self.eot_token_id
        return self.tokenizer_.eot_token

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As transformers' tokenizer(string): with the special tokens its post-processor adds
        (Llama 3's BOS) unless add_special_tokens is False or the string already starts with BOS."""
        if not self.family_tokenizer:
            return self.tokenizer_.encode(string, allowed_special="all")
        if add_special_tokens is None:
            bos = self.tokenizer_.special.get("bos_token")
            add_special_tokens = not (bos and string.startswith(bos))
        return (self.tokenizer_.encode_text if add_special_tokens else self.tokenizer_.encode)(string)

    def tok_decode(self, ids) -> str:
        return self.tokenizer_.decode([i for i in ids if i < self.tokenizer_.n_vocab])

    # --- scoring ---

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = loglikelihoods(self.params, self.config, pairs, batch_size=self.batch_size,
                                 max_length=self.max_length, progress=self.progress and not disable_tqdm)
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, (string,) in enumerate(r.args for r in requests):
            for pair in rolling_windows(self.tok_encode(string), self.prefix_token_id, self.max_length):
                windows.append((None, *pair))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, scores):
            totals[n] += logp
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    # --- generation ---

    def engine(self) -> Engine:
        """The continuous-batching engine (started on first use, kept for the next requests)."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = Engine(self.params, self.config, slots=self.batch_size,
                                      max_len=self.max_length).start()
            return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.stop()
            self._engine = None

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        jobs = [self._job(context, kwargs) for context, kwargs in (r.args for r in requests)]
        bar = tqdm(total=len(jobs), desc="generate_until", disable=disable_tqdm or not self.progress)
        for job in jobs:
            job.request.on_done = lambda reason: bar.update(1)
        run_to_end(self.engine(), [job.request for job in jobs])
        bar.close()
        texts = [job.text() for job in jobs]
        for r, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", r.args, text)
        return texts

    def _job(self, context: str, gen_kwargs: dict) -> "_Generation":
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
        max_new = min(int(kwargs.pop("max_gen_toks")), self.max_length - 1)
        prompt = self.tok_encode(context)[-(self.max_length - max_new):]
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        return _Generation(self, prompt, max_new, until, temperature)


class _Generation:
    """One generate_until request: its engine request and the text it has so far; it ends at
    the first stop string (the text is cut there) or a stop id."""

    def __init__(self, lm: JaxgptLM, prompt: list[int], max_new: int, until: list[str],
                 temperature: float):
        self.until = [u for u in until if u]
        self.decoder = TextDecoder(lm.tokenizer_)
        self.pieces: list[str] = []
        self.request = Request(prompt=prompt, max_tokens=max_new, on_token=self.on_token,
                               temperature=temperature, seed=lm.seed, stop_ids=lm.stop_ids)

    def on_token(self, token: int, finish) -> bool:
        if token in self.request.stop_ids:
            return False
        self.pieces.append(self.decoder.feed(token))
        tail = "".join(self.pieces[-64:])
        return not any(u in tail for u in self.until)

    def text(self) -> str:
        text = "".join(self.pieces) + self.decoder.flush()
        cut = min((text.find(u) for u in self.until if u in text), default=len(text))
        return text[:cut]
