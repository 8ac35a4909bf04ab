"""Scoring responses with a judge model (chapter 7's evaluation) over an OpenAI-style chat API.

Any server that answers `POST {base_url}/chat/completions` works: Ollama
(`ollama serve`, then `ollama pull llama3`; base URL http://localhost:11434/v1), vLLM
(`vllm serve MODEL`; http://localhost:8000/v1) or a hosted API with a key. Each test record's
response is scored 0-100 against the reference output; the score is the mean over the replies
that held a usable score. The judge is asked to end with a line `Score: N`; the parser takes the
last such line, so reasoning that mentions other numbers first cannot be misread.

A run saves each record's score to a progress file as it goes (rewritten atomically), so a run
that fails midway, rerun with the same arguments, asks only for the records not yet scored.
Credentials (an API key, or user:password in the base URL) never appear in errors.

The command line is `python -m jaxgpt.cli.judge` (jaxgpt/cli/judge.py).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from jaxgpt.data.prompts import get_template
from jaxgpt.fsutil import sha256_bytes, write_json_atomic

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
            "Score it from 0 to 100, where 100 is the best. You may explain briefly first; end "
            "your reply with a final line of the form `Score: N`, with N an integer from 0 to 100.")


_NUM = r"(-?\d+(?:\.\d+)?)"
_OF = rf"[ \t]*(?:/|out of)[ \t]*{_NUM}"
# "Score: 85", "**Score:** 85", "Score (0-100): 85", "score = 85/100", "Score: 7/10"
_SCORE_LINE = re.compile(rf"\bscore\b\s*(?:\([^)\n]*\))?[*_\s]*[:=][*_\s]*{_NUM}(?:{_OF})?",
                         re.IGNORECASE)
_RATIO = re.compile(rf"{_NUM}{_OF}", re.IGNORECASE)
_NUMBER = re.compile(_NUM)


def _value(number: str, scale: str | None) -> float | None:
    if scale is not None:  # "7/10" is a score on another scale: rescale it to 0-100
        if float(scale) <= 0:
            return None
        value = float(number) / float(scale) * 100.0
    else:
        value = float(number)
    # Out of range is a reply that ignored the scale, not a score to clip.
    return value if 0.0 <= value <= 100.0 else None


def parse_score(reply: str) -> float | None:
    """The 0-100 score in a judge's reply, or None if it has no usable one.

    The last `Score: N` (or `Score: N/M`, rescaled) wins, range-checked. A reply without one
    counts only if it is unambiguous: it holds exactly one number ("85", "I'd give it 60.")
    or one ratio and no other number ("8/10", "7 out of 10")."""
    lines = _SCORE_LINE.findall(reply)
    if lines:
        return _value(*(g or None for g in lines[-1]))
    ratios = _RATIO.findall(reply)
    if len(ratios) == 1 and not _NUMBER.search(_RATIO.sub(" ", reply)):
        return _value(*ratios[0])
    numbers = _NUMBER.findall(reply)
    return _value(numbers[0], None) if len(numbers) == 1 else None


def url_secrets(base_url: str) -> list[str]:
    """The credential in a URL (user:secret@host, or token@host): the user:secret pair and the
    secret (the user name alone is no secret), as written, decoded, and as a Basic token."""
    userinfo = urllib.parse.urlsplit(base_url).netloc.rpartition("@")[0]
    if not userinfo:
        return []
    parts = [userinfo, userinfo.partition(":")[2]]
    return [x for p in parts for x in {p, urllib.parse.unquote(p)} if x] + [_basic(userinfo)]


def _basic(userinfo: str) -> str:
    user, _, password = (urllib.parse.unquote(x) for x in userinfo.partition(":"))
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every secret replaced by ***, longest first (one may hold another)."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


class ChatClient:
    """A minimal client of an OpenAI-compatible chat completions endpoint, with retries."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, model: str = "llama3", *,
                 api_key: str | None = None, timeout: float = 120.0, retries: int = 4,
                 backoff: float = 1.0, sleep: Callable[[float], None] = time.sleep):
        self.secrets = [api_key, *url_secrets(base_url)]
        parts = urllib.parse.urlsplit(base_url)
        userinfo, _, host = parts.netloc.rpartition("@")
        # The URL the client shows and requests carries no credentials; they go in a header.
        self.url = urllib.parse.urlunsplit(parts._replace(netloc=host)).rstrip("/") + "/chat/completions"
        shown = self.url.removesuffix("/chat/completions")
        if parts.scheme not in ("http", "https") or not host:
            raise JudgeError(f"judge base URL {shown!r} is not an http:// or https:// URL")
        try:
            parts.port
        except ValueError:
            raise JudgeError(f"judge base URL {shown!r} has a port that is not a number") from None
        if api_key is not None and (not api_key.isprintable() or api_key != api_key.strip()):
            raise JudgeError("the judge API key holds whitespace or control characters")
        if userinfo and api_key:
            raise JudgeError("give the judge's credential either in the base URL or as an API key, "
                             "not both")
        self.auth = f"Bearer {api_key}" if api_key else None
        if userinfo:  # HTTP Basic, as curl and browsers send a URL's user:password
            self.auth = f"Basic {_basic(userinfo)}"
        self.model, self.timeout = model, timeout
        self.retries, self.backoff, self.sleep = retries, backoff, sleep

    def _post(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.auth:
            headers["Authorization"] = self.auth
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
            except urllib.error.HTTPError as err:  # a server may echo what it was sent: redact
                detail = redact(_first_line(err.read().decode("utf-8", "replace")), self.secrets)
                if err.code not in RETRY_STATUS:
                    raise JudgeError(f"judge endpoint {self.url} refused the request: HTTP "
                                     f"{err.code} {detail}") from None
                reason = f"HTTP {err.code} {detail}"
                after = err.headers.get("Retry-After", "") if err.headers else ""
                wait = float(after) if after.replace(".", "", 1).isdigit() else wait
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as err:
                reason = redact(str(getattr(err, "reason", err)), self.secrets)
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


def _record_key(model: str, prompt: str) -> str:
    return sha256_bytes(json.dumps([model, prompt]).encode("utf-8"))


def _read_progress(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        progress = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it to score from the start") from None
    scored = progress.get("scored") if isinstance(progress, dict) else None
    if not isinstance(scored, dict):
        raise ValueError(f"{path} is not a judge progress file; delete it to score from the start")
    return scored


def score_responses(records: Sequence[Mapping[str, str]], client: ChatClient, *,
                    template: str = "alpaca", response_key: str = "model_response",
                    progress: str | os.PathLike | None = None) -> dict:
    """{"scores": one per record (None if unusable), "mean": over usable ones, "unparsed": n,
    "resumed": how many scores came from `progress`}.

    With `progress`, each record's score is saved there once the judge answers, and a record
    already saved for the same model and prompt is not asked again; delete the file once the
    result is kept elsewhere."""
    path = Path(progress) if progress is not None else None
    scored = _read_progress(path) if path else {}
    scores, resumed = [], 0
    for i, record in enumerate(records):
        prompt = judge_prompt(record, record[response_key], template)
        key, saved = _record_key(client.model, prompt), scored.get(str(i))
        if isinstance(saved, dict) and saved.get("key") == key:
            scores.append(saved.get("score"))
            resumed += 1
            continue
        scores.append(parse_score(client.complete([{"role": "user", "content": prompt}])))
        if path:
            scored[str(i)] = {"key": key, "score": scores[-1]}
            write_json_atomic(path, {"scored": scored}, indent=None)
    usable = [s for s in scores if s is not None]
    mean = sum(usable) / len(usable) if usable else None
    return {"scores": scores, "mean": mean, "unparsed": len(scores) - len(usable), "resumed": resumed}
