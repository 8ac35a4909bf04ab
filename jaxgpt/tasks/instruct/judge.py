"""Scoring responses with a judge model (chapter 7's evaluation) over an OpenAI-style chat API.

Any server that answers `POST {base_url}/chat/completions` works: Ollama
(`ollama serve`, then `ollama pull llama3`; base URL http://localhost:11434/v1), vLLM
(`vllm serve MODEL`; http://localhost:8000/v1) or a hosted API with a key. Each test record's
response is scored 0-100 against the reference output; the score is the mean over the replies
that held a usable number.

The command line is `python -m jaxgpt.cli.judge` (jaxgpt/cli/judge.py).
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from typing import Callable, Mapping, Sequence

from jaxgpt.tasks.instruct.prompts import get_template

DEFAULT_BASE_URL = "http://localhost:11434/v1"  # Ollama's OpenAI-compatible API
RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)  # worth another try; other errors are not
MAX_WAIT_S = 60.0  # the longest single wait between tries, whatever the server asks for


class JudgeError(RuntimeError):
    """The judge endpoint failed or answered in an unexpected shape; one line."""


def judge_prompt(record: Mapping[str, str], response: str, template: str = "alpaca") -> str:
    """The request to score `response` to `record` against its reference output."""
    task = get_template(template).prompt(record)
    return (f"You are grading an answer to a task.\n\nTask:\n{task}\n\n"
            f"Reference answer:\n{record['output']}\n\nAnswer to grade:\n{response}\n\n"
            "How well does the answer to grade complete the task, compared with the reference? "
            "Give a score from 0 to 100, where 100 is the best. Reply with the integer only.")


_RATIO = re.compile(r"(-?\d+(?:\.\d+)?)\s*(?:/|out of)\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score(reply: str) -> float | None:
    """The 0-100 score in a reply ("85", "Score: 85.", "8/10" -> 80), or None if it has none."""
    ratio = _RATIO.search(reply)
    if ratio and float(ratio.group(2)) > 0:
        value = float(ratio.group(1)) / float(ratio.group(2)) * 100.0
    else:
        number = _NUMBER.search(reply)
        if number is None:
            return None
        value = float(number.group())
    # Out of range is a reply that ignored the scale, not a score to clip.
    return value if 0.0 <= value <= 100.0 else None


class ChatClient:
    """A minimal client of an OpenAI-compatible chat completions endpoint, with retries."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, model: str = "llama3", *,
                 api_key: str | None = None, timeout: float = 120.0, retries: int = 4,
                 backoff: float = 1.0, sleep: Callable[[float], None] = time.sleep):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.retries, self.backoff, self.sleep = retries, backoff, sleep

    def _post(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as reply:
            return json.loads(reply.read().decode("utf-8"))

    def complete(self, messages: Sequence[Mapping[str, str]], **options) -> str:
        """The assistant's reply text (deterministic by default: temperature 0)."""
        body = json.dumps({"model": self.model, "messages": list(messages),
                           "temperature": 0.0, **options}).encode("utf-8")
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2 ** attempt
            try:
                reply = self._post(body)
                break
            except urllib.error.HTTPError as err:
                detail = _first_line(err.read().decode("utf-8", "replace"))
                if err.code not in RETRY_STATUS:
                    raise JudgeError(f"judge endpoint {self.url} refused the request: HTTP "
                                     f"{err.code} {detail}") from None
                reason = f"HTTP {err.code} {detail}"
                after = err.headers.get("Retry-After", "") if err.headers else ""
                wait = float(after) if after.replace(".", "", 1).isdigit() else wait
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                reason = str(getattr(err, "reason", err))
            except json.JSONDecodeError:
                raise JudgeError(f"judge endpoint {self.url} did not answer with JSON") from None
            if attempt == self.retries:
                raise JudgeError(f"cannot reach judge endpoint {self.url} after "
                                 f"{self.retries + 1} tries: {reason}")
            self.sleep(min(wait, MAX_WAIT_S))
        try:
            return reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"judge endpoint {self.url} answered without "
                             "choices[0].message.content") from None


def _first_line(text: str, limit: int = 200) -> str:
    return text.strip().splitlines()[0][:limit] if text.strip() else ""


def score_responses(records: Sequence[Mapping[str, str]], client: ChatClient, *,
                    template: str = "alpaca", response_key: str = "model_response") -> dict:
    """{"scores": one per record (None if unusable), "mean": over usable ones, "unparsed": n}."""
    scores = []
    for record in records:
        prompt = judge_prompt(record, record[response_key], template)
        scores.append(parse_score(client.complete([{"role": "user", "content": prompt}])))
    usable = [s for s in scores if s is not None]
    mean = sum(usable) / len(usable) if usable else None
    return {"scores": scores, "mean": mean, "unparsed": len(scores) - len(usable)}
