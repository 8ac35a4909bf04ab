"""The OpenAI-compatible server, talked to by the official `openai` client over loopback.

One server per module (a tiny random GPT-2-vocabulary model saved to a temp dir, 8 slots)
runs in a thread of this process. Outputs are checked against `jaxgpt.generate` on the same
prompt (greedy), against the same request run alone (seeded samples), and every refusal
against its 400 body; the chat page is driven in headless chromium when one is installed.
"""

import contextlib
import http.client
import json
import re
import shutil
import socket
import threading
import time

import jax
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from jaxgpt.inference import engine as engine_module  # noqa: E402
from jaxgpt.inference.server import build_app, make_server  # noqa: E402
from jaxgpt.config import GPTConfig  # noqa: E402
from jaxgpt.inference.generate import generate  # noqa: E402
from jaxgpt.models.model import init_params  # noqa: E402
from jaxgpt.weights.huggingface import save_pretrained  # noqa: E402
from jaxgpt.data.prompts import get_template  # noqa: E402
from jaxgpt.data.tokenizer import EOT_ID, get_tokenizer  # noqa: E402

CONFIG = GPTConfig(vocab_size=50257, context_length=256, emb_dim=12, n_heads=3, n_layers=2,
                   drop_rate=0.0, dtype="float32")
SLOTS, MAX_QUEUE = 8, 3
TOK = get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    params = init_params(CONFIG, jax.random.key(11))
    return save_pretrained(CONFIG, params, tmp_path_factory.mktemp("tiny") / "tiny-gpt"), params


@contextlib.contextmanager
def web_app(app):
    """`app` served by uvicorn in a thread on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    web = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if get(base, "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.05)
    try:
        yield base
    finally:
        web.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def served(model_dir):
    directory, _ = model_dir
    server = make_server(str(directory), slots=SLOTS, max_queue=MAX_QUEUE)
    with web_app(build_app(server)) as base:
        yield server, base
    server.engine.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(base: str, path: str, body) -> tuple[int, str]:
    """(status, text) of a raw POST; `body` a dict (sent as JSON) or a string sent as is."""
    conn = http.client.HTTPConnection(*base.removeprefix("http://").split(":"), timeout=60)
    try:
        conn.request("POST", path, body if isinstance(body, str) else json.dumps(body),
                     {"Content-Type": "application/json"})
        reply = conn.getresponse()
        return reply.status, reply.read().decode()
    finally:
        conn.close()


def get(base: str, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*base.removeprefix("http://").split(":"), timeout=10)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        conn.close()


def expected(params, text: str, max_tokens: int, stops=()) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of jaxgpt.generate's greedy continuation."""
    ids = TOK.encode(text)
    new = generate(params, CONFIG, [ids], max_tokens, eos_id=EOT_ID)[0, len(ids):].tolist()
    finish, count = "length", len(new)
    if EOT_ID in new:
        new, finish = new[:new.index(EOT_ID)], "stop"
        count = len(new) + 1
    out = TOK.decode(new)
    hits = [i for s in stops if (i := out.find(s)) >= 0]
    if hits:
        out, finish = out[:min(hits)], "stop"
    return out, finish, count


def chat_prompt(messages) -> str:
    """The Alpaca rendering of a one-turn chat, written out here from the template."""
    return get_template("alpaca").query({"instruction": messages[-1]["content"], "input": ""})


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_models_and_health(client, served):
    assert [m.id for m in client.models.list().data] == ["tiny-gpt"]
    health = get(served[1], "/health")[1]
    assert health["status"] == "ok" and health["slots"] == SLOTS


def test_completion_greedy_equals_generate(client, model_dir):
    prompt = "Every effort moves you"
    got = client.completions.create(model="tiny-gpt", prompt=prompt, max_tokens=12, temperature=0)
    text, finish, count = expected(model_dir[1], prompt, 12)
    assert got.choices[0].text == text and got.choices[0].finish_reason == finish
    n = len(TOK.encode(prompt))
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (n, count)
    assert got.usage.total_tokens == n + count


def test_completion_stream_matches_and_ends_with_done(client, served, model_dir):
    prompt = "The quick brown fox"
    chunks = list(client.completions.create(model="tiny-gpt", prompt=prompt, max_tokens=20,
                                            temperature=0, stream=True))
    text, finish, _ = expected(model_dir[1], prompt, 20)
    assert "".join(c.choices[0].text for c in chunks) == text
    assert [c.choices[0].finish_reason for c in chunks][-1] == finish
    status, raw = post(served[1], "/v1/completions", {
        "model": "tiny-gpt", "prompt": prompt, "max_tokens": 3, "stream": True})
    assert status == 200
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_string_ends_the_text_before_it(client, model_dir):
    prompt = "Every effort moves you"
    full, _, _ = expected(model_dir[1], prompt, 30)
    stop = full[5:8]  # a piece of what greedy decoding will write
    got = client.completions.create(model="tiny-gpt", prompt=prompt, max_tokens=30,
                                    temperature=0, stop=[stop, "never appears \x00"])
    assert got.choices[0].text == full[:full.index(stop)]
    assert got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny-gpt", prompt=prompt, max_tokens=30,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.index(stop)]


def test_chat_greedy_equals_generate_streamed_and_not(client, model_dir):
    messages = [{"role": "user", "content": "Name three colors."}]
    text, finish, count = expected(model_dir[1], chat_prompt(messages), 40,
                                   get_template("alpaca").turn_starts)
    got = client.chat.completions.create(model="tiny-gpt", messages=messages, max_tokens=40,
                                         temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == text and got.choices[0].finish_reason == finish
    assert got.usage.prompt_tokens == len(TOK.encode(chat_prompt(messages)))
    chunks = list(client.chat.completions.create(model="tiny-gpt", messages=messages,
                                                 max_tokens=40, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_seeded_sample_alone_equals_among_seven_others(client):
    ask = dict(model="tiny-gpt", prompt="Once upon a time", max_tokens=24, temperature=0.9,
               top_p=0.9, seed=2024, extra_body={"top_k": 400})
    alone = client.completions.create(**ask).choices[0].text
    results = {}

    def run(i):
        if i == 3:
            results[i] = client.completions.create(**ask).choices[0].text
        else:
            results[i] = client.completions.create(
                model="tiny-gpt", prompt="Other text " * (i + 1), max_tokens=30,
                temperature=1.2, seed=i, stream=False).choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[3] == alone and len(results) == 8
    other = client.completions.create(**{**ask, "seed": 7}).choices[0].text
    assert other != alone  # the seed decides (24 draws from ~50k tokens: equal ~never)


GOOD = {"model": "tiny-gpt", "prompt": "Hello", "max_tokens": 2}
BAD = [
    ("not json {", "not valid JSON", None),
    ({**GOOD, "max_tokens": "ten"}, "'max_tokens' must be an integer", "max_tokens"),
    ({**GOOD, "temperature": "hot"}, "'temperature' must be a number", "temperature"),
    ({**GOOD, "prompt": {"text": 1}}, "'prompt' must be a string", "prompt"),
    ({**GOOD, "stream": "yes"}, "'stream' must be a boolean", "stream"),
    ({**GOOD, "prompt": "word " * 300}, "maximum context length is 256", "prompt"),
    ({**GOOD, "max_tokens": 0}, "'max_tokens' must be at least 1", "max_tokens"),
    ({**GOOD, "max_tokens": 300}, "asks for 300 more", "max_tokens"),
    ({**GOOD, "temperature": -0.5}, "'temperature' must be a finite number >= 0", "temperature"),
    ({**GOOD, "top_p": 0}, r"'top_p' must be in \(0, 1\]", "top_p"),
    ({**GOOD, "top_p": 1.5}, r"'top_p' must be in \(0, 1\]", "top_p"),
    ({**GOOD, "model": "gpt-4"}, "the model 'gpt-4' does not exist", "model"),
    ({**GOOD, "n": 2}, "'n' must be 1", "n"),
    ({**GOOD, "stop": [1]}, "'stop' must be", "stop"),
]


@pytest.mark.parametrize("body, message, param", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_input_is_a_400_and_the_server_keeps_serving(served, client, body, message, param):
    status, text = post(served[1], "/v1/completions", body)
    assert status == 400
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert re.search(message, error["message"]), error["message"]
    assert "\n" not in error["message"]
    assert client.completions.create(**GOOD).usage.completion_tokens >= 1


def test_bad_chat_input_through_the_client(client):
    with pytest.raises(openai.BadRequestError, match="must end with a user message"):
        client.chat.completions.create(model="tiny-gpt", messages=[
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert client.chat.completions.create(model="tiny-gpt", max_tokens=2, messages=[
        {"role": "user", "content": "hi"}]).choices[0].finish_reason in ("stop", "length")


def test_unimplemented_and_unknown_fields_are_refused_by_name(client):
    chat = dict(model="tiny-gpt", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    refused = [
        (client.completions.create, {**GOOD, "logprobs": 2}, "logprobs"),
        (client.completions.create, {**GOOD, "echo": True}, "echo"),
        (client.completions.create, {**GOOD, "extra_body": {"mystery": 1}}, "mystery"),
        (client.chat.completions.create, {**chat, "logprobs": True}, "logprobs"),
        (client.chat.completions.create, {**chat, "top_logprobs": 2}, "top_logprobs"),
    ]
    for create, ask, param in refused:
        with pytest.raises(openai.BadRequestError, match=f"'{param}'") as caught:
            create(**ask)
        assert caught.value.body["param"] == param and "\n" not in caught.value.message
    # Ordinary calls, with the options the client knows set to what we implement or to off.
    got = client.completions.create(**GOOD, temperature=0.5, top_p=0.9, seed=3, stop=["\n"],
                                    n=1, user="u", logprobs=None, echo=False,
                                    presence_penalty=0, frequency_penalty=0)
    assert got.choices[0].finish_reason in ("stop", "length")
    reply = client.chat.completions.create(**chat, logprobs=False, user="u", seed=1,
                                           max_completion_tokens=2, stream=True,
                                           stream_options={"include_usage": True})
    assert list(reply)[-1].usage.completion_tokens >= 1


def send_headers(base: str, path: str, headers: dict) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(*base.removeprefix("http://").split(":"), timeout=60)
    conn.putrequest("POST", path)
    for k, v in {"Content-Type": "application/json", **headers}.items():
        conn.putheader(k, v)
    conn.endheaders()
    return conn


def too_large(conn: http.client.HTTPConnection, limit: int) -> str:
    reply = conn.getresponse()
    error = json.loads(reply.read())["error"]
    conn.close()
    assert reply.status == 413 and error["code"] == "request_too_large"
    assert f"at most {limit} bytes" in error["message"] and "\n" not in error["message"]
    return error["message"]


def test_a_body_over_the_limit_is_a_413_before_it_is_read(served):
    server, _ = served
    limit = 4096
    with web_app(build_app(server, max_body_bytes=limit)) as base:
        # Content-Length says too much: refused with no byte of the body sent.
        conn = send_headers(base, "/v1/completions", {"Content-Length": str(50 << 20)})
        assert "got 52428800 bytes" in too_large(conn, limit)
        # Chunked: refused once what came passes the limit; meanwhile others are served.
        conn = send_headers(base, "/v1/chat/completions", {"Transfer-Encoding": "chunked"})
        piece = b'{"model": "tiny-gpt", "messages": [{"role": "user", "content": "' + b"x" * 3000
        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        small = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert small.completions.create(**GOOD).usage.completion_tokens >= 1
        conn.send(b"%x\r\n%s\r\n" % (3000, b"x" * 3000))
        assert f"more than {limit} bytes" in too_large(conn, limit)
        status, text = post(base, "/v1/completions", {**GOOD, "prompt": "x" * (limit - 100)})
        assert status == 400 and "maximum context length" in text  # read, parsed: too long


@pytest.fixture
def slow_engine(monkeypatch):
    """Each decode step waits on `gate` (set: run freely) and then `delay` seconds."""
    gate, knobs = threading.Event(), {"delay": 0.0}
    gate.set()
    real = engine_module._decode

    def decode(*args, **kwargs):
        gate.wait()
        time.sleep(knobs["delay"])
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "_decode", decode)
    yield gate, knobs
    gate.set()


def test_disconnect_mid_stream_frees_the_slot(served, slow_engine):
    server, base = served
    slow_engine[1]["delay"] = 0.05  # 200 tokens would take 10 s: the disconnect comes first
    before = server.engine.load()
    conn = http.client.HTTPConnection(*base.removeprefix("http://").split(":"), timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({
        "model": "tiny-gpt", "prompt": "Tell me", "max_tokens": 200, "stream": True,
        "temperature": 0}), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    got = [reply.readline() for _ in range(3)]
    assert reply.status == 200 and any(g.startswith(b"data: {") for g in got)
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
    conn.close()
    wait_for(lambda: server.engine.load()["running"] == 0, timeout=8.0)
    after = server.engine.load()
    assert after["cancelled"] == before["cancelled"] + 1  # freed by the disconnect, not the end
    assert after["tokens"] - before["tokens"] < 200


def test_queue_full_is_a_429_and_the_rest_are_served(served, client, slow_engine):
    server, _ = served
    gate = slow_engine[0]
    gate.clear()  # the engine admits the first request, then holds at its first decode step
    results, errors = [], []

    def run():
        try:
            results.append(client.completions.create(**{**GOOD, "max_tokens": 3}))
        except Exception as err:  # noqa: BLE001 - collected, asserted below
            errors.append(err)

    first = threading.Thread(target=run)
    first.start()
    wait_for(lambda: server.engine.load()["running"] == 1)
    threads = [threading.Thread(target=run) for _ in range(SLOTS - 1 + MAX_QUEUE)]
    for t in threads:
        t.start()
    wait_for(lambda: server.engine.load()["queued"] == SLOTS - 1 + MAX_QUEUE)
    with pytest.raises(openai.RateLimitError, match="at capacity") as caught:
        client.completions.create(**GOOD)
    assert caught.value.status_code == 429
    assert caught.value.body["code"] == "rate_limit_exceeded"
    gate.set()
    for t in [first, *threads]:
        t.join(60)
    assert errors == [] and len(results) == SLOTS + MAX_QUEUE
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in results)


def test_judge_scores_responses_against_this_server(served, model_dir, tmp_path, capsys):
    from jaxgpt.cli import judge as judge_cli
    from jaxgpt.tasks.instruct.judge import judge_prompt, parse_score

    records = [{"instruction": "Name a color.", "input": "", "output": "Blue.",
                "model_response": "Red."},
               {"instruction": "Add 2 and 3.", "input": "", "output": "5",
                "model_response": "6"}]
    path = tmp_path / "test_responses.json"
    path.write_text(json.dumps(records))
    out = tmp_path / "scored.json"
    code = judge_cli.main([str(path), "--model", "tiny-gpt", "--base-url", served[1] + "/v1",
                           "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "judge tiny-gpt: mean score" in capsys.readouterr().out
    scored = json.loads(out.read_text())
    for record, got in zip(records, scored):
        # The judge's reply is the server's greedy answer to the judge prompt: recompute it.
        messages = [{"role": "user", "content": judge_prompt(record, record["model_response"])}]
        reply, _, _ = expected(model_dir[1], chat_prompt(messages),
                               CONFIG.context_length - len(TOK.encode(chat_prompt(messages))),
                               get_template("alpaca").turn_starts)
        assert got["score"] == parse_score(reply)


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no chromium and chromedriver installed (apt-get install chromium "
                    "chromium-driver; .ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=900,700"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service
    return webdriver.Chrome(service=Service(driver), options=options)


def test_chat_page_streams_a_reply_in_a_browser(served, model_dir, tmp_path, slow_engine):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.get(served[1] + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.ID, "model-name").text == "tiny-gpt")
        box = browser.find_element(By.ID, "input")
        box.send_keys("Name three colors.")
        slow_engine[1]["delay"] = 0.02  # 128 tokens take ~3 s: the reply is seen growing
        box.send_keys(Keys.ENTER)
        partial = wait.until(lambda b: b.execute_script(
            "const a = document.querySelector('.assistant');"
            "return a && !a.dataset.done && a.textContent.length > 0 ? a.textContent : null;"))
        reply = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".assistant[data-done]"))
        text, _, _ = expected(model_dir[1], chat_prompt([{"content": "Name three colors."}]), 128,
                              get_template("alpaca").turn_starts)
        # The page shows the streamed reply; innerText may trim trailing whitespace.
        assert reply.get_attribute("textContent") == text and text.strip()
        assert text.startswith(partial) and len(partial) < len(text)  # it arrived in pieces
        assert browser.find_element(By.CSS_SELECTOR, ".user").text == "Name three colors."
        shot = tmp_path / "chat_page.png"
        browser.save_screenshot(str(shot))
        shutil.copy(shot, "/tmp/serve_screenshot.png")
        assert shot.stat().st_size > 1000
    finally:
        browser.quit()


def test_the_command_serves_until_interrupted(model_dir):
    """`python -m jaxgpt.cli.serve` end to end: it binds loopback, answers, stops on Ctrl-C;
    a bad option is one line on stderr."""
    import os
    import signal
    import subprocess
    import sys

    directory, params = model_dir
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAXGPT_DEBUG": ""}
    proc = subprocess.Popen([sys.executable, "-m", "jaxgpt.cli.serve", "--model", str(directory),
                             "--port", str(port), "--slots", "2", "--max-body-bytes", "2048"],
                            env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if get(base, "/health")[0] == 200:
                    break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        status, text = post(base, "/v1/completions", {"model": "tiny-gpt", "prompt": "Hi",
                                                      "max_tokens": 5, "temperature": 0})
        assert status == 200
        assert json.loads(text)["choices"][0]["text"] == expected(params, "Hi", 5)[0]
        too_large(send_headers(base, "/v1/completions", {"Content-Length": "2049"}), 2048)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and f"serving tiny-gpt at http://127.0.0.1:{port}/" in err
    bad = subprocess.run([sys.executable, "-m", "jaxgpt.cli.serve", "--model", str(directory),
                          "--max-len", "999"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip() == "error: max_len must be in [1, 256], got 999"
