"""The judge client: prompt, score parsing, retries, resuming and redaction, against a local
fake endpoint on 127.0.0.1."""

import base64
import functools
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jaxgpt.cli.judge import main
from jaxgpt.tasks.instruct.judge import (
    ChatClient,
    JudgeError,
    judge_prompt,
    parse_score,
    score_responses,
)
from jaxgpt.tasks.instruct.judge import ChatClient as RealClient

RECORD = {"instruction": "Rewrite the sentence in passive voice.", "input": "The cat ate the fish.",
          "output": "The fish was eaten by the cat."}


def test_prompt_holds_task_reference_response_and_scale():
    prompt = judge_prompt(RECORD, "The fish got eaten.")
    for part in (RECORD["instruction"], RECORD["input"], RECORD["output"], "The fish got eaten.",
                 "0 to 100", "final line of the form `Score: N`"):
        assert part in prompt
    assert "### Input:" in prompt and "### Response:" not in prompt
    bare = judge_prompt({**RECORD, "input": ""}, "x")
    assert "### Input:" not in bare
    assert "<|user|>" in judge_prompt(RECORD, "x", template="phi3")


@pytest.mark.parametrize("reply, score", [
    ("85", 85.0), ("  92\n", 92.0), ("Score: 73.", 73.0), ("I would give it 60 points.", 60.0),
    ("87.5", 87.5), ("90/100", 90.0), ("8/10", 80.0), ("7 out of 10", 70.0), ("0", 0.0),
    ("100", 100.0),
    ("no number here", None), ("", None), ("150", None), ("120/100", None), ("-5", None),
    ("1000 out of 100", None),
    # Reasoning first: numbers before the score line are not the score.
    ("Response 1 of 2 is decent; compared to 100 it lacks detail.\nScore: 85", 85.0),
    ("Of the 3 points asked for, it covers 2.\n\n**Score:** 67", 67.0),
    ("Score (0-100): 40", 40.0), ("score = 55", 55.0), ("Final score: 90/100", 90.0),
    ("score: 7/10", 70.0),  # a score on another scale is rescaled to 0-100
    ("Score: 40\nOn reflection it misses the voice change.\nScore: 20", 20.0),  # the last wins
    ("Score: 85\nScore: 150", None),  # the last is out of range: unusable, not the earlier one
    ("Score: 150", None), ("Score: -3", None), ("Score: 11/10", None), ("Score: 5/0", None),
    ("Score: N", None),
    # Without a score line only an unambiguous reply counts.
    ("Response 1 of 2: compared to 100 it is an 85", None), ("I give it 8/10 for 3 reasons", None),
    ("On a 0-100 scale, 85", None),
    # Unusual notation is read whole or not at all, never as its first digits.
    ("Score: 8.5e1", 85.0), ("Score: 1e2", 100.0), ("Score: .5", 0.5), ("Score: 8.5E+1/100", 85.0),
    ("Score: 0x55", None), ("Score: 85,5", None), ("Score: 9\u00bd", None), ("Score: 1_000", None),
    ("Score: 85.5.3", None), ("Score: 85e", None), ("Score: 1e400", None), ("8,5", None),
    ("Score: 85, which is fair.", 85.0), ("Score: **85**.", 85.0), ("Score: 85%", 85.0),
])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


class _Fake(BaseHTTPRequestHandler):
    """Fails with `failures` statuses in turn (and with 503 for every request after the first
    `fail_after`), then answers with `content` (a string, or a function of the request body).
    With `echo`, a failure's body repeats the Authorization header it was sent."""

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        auth = self.headers.get("Authorization")
        server.requests.append((self.path, body, auth))
        past_limit = server.fail_after is not None and len(server.requests) > server.fail_after
        if server.failures or past_limit:
            status = server.failures.pop(0) if server.failures else 503
            self.send_response(status)
            self.end_headers()
            self.wfile.write(f"bad credentials {auth}\n".encode() if server.echo else b"busy\n")
            return
        content = server.content(body) if callable(server.content) else server.content
        payload = json.dumps({"choices": [{"message": {"role": "assistant",
                                                       "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    httpd.requests, httpd.failures, httpd.content = [], [], "88"
    httpd.fail_after, httpd.echo = None, False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _client(httpd, **kwargs):
    waits = []
    client = ChatClient(f"http://127.0.0.1:{httpd.server_port}/v1/", "judge-model",
                        sleep=waits.append, **kwargs)
    return client, waits


def test_request_shape(server):
    client, waits = _client(server, api_key="secret")
    assert client.complete([{"role": "user", "content": "hi"}]) == "88"
    path, body, auth = server.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer secret" and waits == []
    assert body == {"model": "judge-model", "messages": [{"role": "user", "content": "hi"}],
                    "temperature": 0.0}


def test_retries_transient_errors_with_backoff(server):
    server.failures = [503, 429, 500]
    client, waits = _client(server, retries=3, backoff=0.5)
    assert client.complete([{"role": "user", "content": "hi"}]) == "88"
    assert len(server.requests) == 4 and waits == [0.5, 1.0, 2.0]


def test_gives_up_after_the_last_retry(server):
    server.failures = [503] * 5
    client, waits = _client(server, retries=2, backoff=1.0)
    with pytest.raises(JudgeError, match=r"after 3 tries: HTTP 503 busy$"):
        client.complete([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 3 and waits == [1.0, 2.0]


def test_client_errors_are_not_retried(server):
    server.failures = [404]
    client, waits = _client(server, retries=3)
    with pytest.raises(JudgeError, match="refused the request: HTTP 404"):
        client.complete([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 1 and waits == []


def test_unreachable_endpoint_is_one_line():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    waits = []
    client = ChatClient(f"http://127.0.0.1:{port}/v1", "m", retries=2, sleep=waits.append)
    with pytest.raises(JudgeError, match=f"cannot reach judge endpoint http://127.0.0.1:{port}/v1/"
                                         "chat/completions after 3 tries") as err:
        client.complete([{"role": "user", "content": "hi"}])
    assert "\n" not in str(err.value) and len(waits) == 2


def test_score_responses_averages_usable_scores(server):
    replies = iter(["80", "no idea", "Score: 60/100"])

    class Scripted(ChatClient):
        def complete(self, messages, **options):
            return next(replies)

    records = [{**RECORD, "model_response": r} for r in ("a", "b", "c")]
    result = score_responses(records, Scripted())
    assert result == {"scores": [80.0, None, 60.0], "mean": 70.0, "unparsed": 1, "resumed": 0}


def test_command_line_scores_a_responses_file(server, tmp_path, capsys):
    responses = tmp_path / "test_responses.json"
    responses.write_text(json.dumps([{**RECORD, "model_response": "x"}] * 2))
    out = tmp_path / "scored.json"
    rc = main([str(responses), "--model", "m", "--out", str(out),
               "--base-url", f"http://127.0.0.1:{server.server_port}/v1"])
    assert rc == 0 and "mean score 88.00 over 2 of 2" in capsys.readouterr().out
    assert [r["score"] for r in json.loads(out.read_text())] == [88.0, 88.0]


# ---- a run that fails midway continues where it stopped ------------------------------------------


def _score_by_answer(body):
    """The judge's reply: reasoning with other numbers first, then a score set by the answer."""
    i = int(re.search(r"answer-(\d+)", body["messages"][0]["content"]).group(1))
    return f"Answer {i} of 5, against a reference worth 100:\nScore: {10 * i + 5}"


def _asked(requests):
    return [int(re.search(r"answer-(\d+)", b["messages"][0]["content"]).group(1)) for _, b, _ in requests]


@pytest.fixture
def quick_client(monkeypatch):
    """The command line's client, without real sleeps between retries."""
    waits = []
    monkeypatch.setattr("jaxgpt.cli.judge.ChatClient",
                        functools.partial(RealClient, retries=1, sleep=waits.append))
    return waits


def test_failed_run_resumes_and_scores_each_record_once(server, tmp_path, capsys, quick_client):
    responses = tmp_path / "test_responses.json"
    responses.write_text(json.dumps([{**RECORD, "model_response": f"answer-{i}"} for i in range(5)]))
    out = tmp_path / "scored.json"
    args = [str(responses), "--model", "m", "--out", str(out),
            "--base-url", f"http://127.0.0.1:{server.server_port}/v1"]
    server.content, server.fail_after = _score_by_answer, 3
    assert main(args) == 1
    err = capsys.readouterr().err
    progress = tmp_path / "scored.json.progress.json"
    assert "after 2 tries: HTTP 503" in err and f"kept in {progress}: rerun" in err
    assert not out.exists() and progress.is_file()
    assert _asked(server.requests) == [0, 1, 2, 3, 3]  # the fourth failed, then its retry failed
    assert sorted(p.name for p in tmp_path.iterdir()) == [progress.name, "test_responses.json"]

    server.requests.clear()
    server.fail_after = None
    assert main(args) == 0
    assert "mean score 25.00 over 5 of 5" in capsys.readouterr().out
    assert _asked(server.requests) == [3, 4]  # only what the first run had not scored
    assert [r["score"] for r in json.loads(out.read_text())] == [5.0, 15.0, 25.0, 35.0, 45.0]
    assert not progress.exists()  # the result is written: nothing left to resume


def test_progress_is_reused_only_for_the_same_prompt_and_model(tmp_path):
    asked = []

    class Scripted(ChatClient):
        def complete(self, messages, **options):
            asked.append(messages[0]["content"])
            return "Score: 50"

    records = [{**RECORD, "model_response": r} for r in ("a", "b", "c")]
    progress = tmp_path / "progress.json"
    score_responses(records, Scripted(model="m"), progress=progress)
    assert len(asked) == 3
    asked.clear()
    records[1] = {**records[1], "model_response": "changed"}
    result = score_responses(records, Scripted(model="m"), progress=progress)
    assert len(asked) == 1 and "changed" in asked[0] and result["resumed"] == 2
    asked.clear()
    score_responses(records, Scripted(model="other"), progress=progress)  # another judge: ask all
    assert len(asked) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["progress.json"]  # no temporary files left
    progress.write_text("{half a fi")
    with pytest.raises(ValueError, match=f"{progress} is not valid JSON.*delete it"):
        score_responses(records, Scripted(model="m"), progress=progress)


@pytest.mark.parametrize("text, message", [
    ("{oops", "is not valid JSON"), ('{"a": 1}', "holds dict, not a JSON array"),
    ("[3]", "record 0 is int, not an object"),
    (json.dumps([{**RECORD, "model_response": "x"}, RECORD]), "record 1 lacks text for model_response"),
], ids=["not-json", "object", "not-a-record", "no-response"])
def test_bad_responses_file_is_one_line_naming_it(tmp_path, capsys, text, message):
    responses = tmp_path / "test_responses.json"
    responses.write_text(text)
    assert main([str(responses), "--model", "m"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {responses}") and message in err and err.count("\n") == 1


# ---- credentials are sent, never shown ----------------------------------------------------------


def test_url_credentials_go_in_a_header_and_are_never_shown(server):
    server.failures, server.echo = [503, 503], True
    client = ChatClient(f"http://bob:hunter%32@127.0.0.1:{server.server_port}/v1", "m",
                        retries=1, sleep=lambda s: None)
    with pytest.raises(JudgeError) as err:
        client.complete([{"role": "user", "content": "hi"}])
    path, _, auth = server.requests[0]
    token = base64.b64encode(b"bob:hunter2").decode()
    assert path == "/v1/chat/completions" and auth == f"Basic {token}"  # %32 decodes to 2
    message = str(err.value)
    assert f"http://127.0.0.1:{server.server_port}/v1/chat/completions" in message
    assert "Basic ***" in message  # the server echoed the header; the error does not
    for secret in ("hunter2", "hunter%32", "bob:", token):
        assert secret not in message


def test_command_line_never_prints_a_key_or_password(server, tmp_path, capsys, monkeypatch, quick_client):
    responses = tmp_path / "test_responses.json"
    responses.write_text(json.dumps([{**RECORD, "model_response": "x"}]))
    monkeypatch.setenv("JUDGE_KEY", "sk-test-4f00d")
    server.failures, server.echo = [401], True
    base = f"http://127.0.0.1:{server.server_port}/v1"
    assert main([str(responses), "--model", "m", "--api-key-env", "JUDGE_KEY", "--base-url", base]) == 1
    err = capsys.readouterr().err
    assert server.requests[0][2] == "Bearer sk-test-4f00d"
    assert "refused the request: HTTP 401 bad credentials Bearer ***" in err and "sk-test" not in err
    monkeypatch.delenv("JUDGE_KEY")
    for url in (f"htp://alice:pa55word@127.0.0.1:{server.server_port}/v1",  # a typo in the scheme
                "http://alice:pa55word@127.0.0.1:bad-port/v1"):
        assert main([str(responses), "--model", "m", "--base-url", url]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "pa55word" not in err and "alice" not in err
    monkeypatch.setenv("OPENAI_API_KEY", "sk-also")
    url = f"http://alice:pa55word@127.0.0.1:{server.server_port}"
    assert main([str(responses), "--model", "m", "--base-url", url]) == 1
    assert "either in the base URL or as an API key" in capsys.readouterr().err
