"""The judge client: prompt, score parsing, and retries against a local fake endpoint."""

import json
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

RECORD = {"instruction": "Rewrite the sentence in passive voice.", "input": "The cat ate the fish.",
          "output": "The fish was eaten by the cat."}


def test_prompt_holds_task_reference_response_and_scale():
    prompt = judge_prompt(RECORD, "The fish got eaten.")
    for part in (RECORD["instruction"], RECORD["input"], RECORD["output"], "The fish got eaten.",
                 "0 to 100"):
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
])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


class _Fake(BaseHTTPRequestHandler):
    """Fails with `failures` statuses in turn, then answers with `content`."""

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append((self.path, body, self.headers.get("Authorization")))
        if server.failures:
            status = server.failures.pop(0)
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"busy\n")
            return
        payload = json.dumps({"choices": [{"message": {"role": "assistant",
                                                       "content": server.content}}]}).encode()
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
    assert result == {"scores": [80.0, None, 60.0], "mean": 70.0, "unparsed": 1}


def test_command_line_scores_a_responses_file(server, tmp_path, capsys):
    responses = tmp_path / "test_responses.json"
    responses.write_text(json.dumps([{**RECORD, "model_response": "x"}] * 2))
    out = tmp_path / "scored.json"
    rc = main([str(responses), "--model", "m", "--out", str(out),
               "--base-url", f"http://127.0.0.1:{server.server_port}/v1"])
    assert rc == 0 and "mean score 88.00 over 2 of 2" in capsys.readouterr().out
    assert [r["score"] for r in json.loads(out.read_text())] == [88.0, 88.0]
