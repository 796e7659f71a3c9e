"""`gpt-sql serve`: the official openai client against the server, run as `gpt-sql serve` in a subprocess on a free
localhost port, over a tiny model in the session's embedded PostgreSQL."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import require

openai = require("openai", "the openai client is not installed (pip install openai)")

MODEL = "serve_tiny"
SHAPE = dict(n_embd=32, n_head=2, n_layer=2, n_ctx=64)


class Server:
    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url

    def client(self, key: str = "none", **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "v1", api_key=key, max_retries=0, **kw)

    def post(self, path: str, body: object, headers: dict | None = None, raw: bytes | None = None) -> tuple[int, dict]:
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path.lstrip("/"), data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def start(dsn: str, *args: str, env: dict | None = None) -> Server:
    proc = subprocess.Popen([sys.executable, "-m", "gpt_sql.runner.cli", "serve", "--port", "0", "--dsn", dsn,
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise AssertionError(f"no URL from the server: {line!r} {proc.stderr.read()}")
    return Server(proc, line.split(" at ")[1].split()[0])


def stop(server: Server) -> tuple[int, str]:
    server.proc.send_signal(signal.SIGINT)
    try:
        _, err = server.proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise AssertionError("the server did not stop within 20 s of Ctrl-C")
    return server.proc.returncode, err


@pytest.fixture(scope="module")
def server(dsn, load_tiny):
    load_tiny(MODEL, **SHAPE)
    s = start(dsn, "--model", MODEL)
    yield s
    code, err = stop(s)
    assert code == 0 and err.strip().splitlines()[-1] == "gpt-sql: stopped", err


@pytest.fixture(scope="module")
def keyed(dsn, load_tiny):
    load_tiny(MODEL, **SHAPE)
    s = start(dsn, "--model", MODEL, "--api-key", "sekrit")
    yield s
    stop(s)


def complete_sql(conn, prompt: str, tokens: int) -> str:
    """complete() in SQL, greedy, cut where <|endoftext|> begins (the API leaves it out of the text)."""
    text = conn.execute(f"SELECT {MODEL}.complete(%s, %s, top_n => 1)", [prompt, tokens]).fetchone()[0]
    return text.split("<|endoftext|>")[0]


def test_models(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.client().models.retrieve(MODEL).id == MODEL


def test_greedy_completion_equals_complete(server, conn):
    r = server.client().completions.create(model=MODEL, prompt="Happy New Year", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == complete_sql(conn, "Happy New Year", 12)
    assert r.choices[0].finish_reason in ("stop", "length")
    n_prompt = len(conn.execute(f"SELECT {MODEL}.tokenize(%s)", ["Happy New Year"]).fetchone()[0])
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.total_tokens == n_prompt + r.usage.completion_tokens
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 12


def test_array_prompt(server, conn):
    prompts = ["The quick brown fox", "SELECT token FROM", ""]
    r = server.client().completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [complete_sql(conn, p, 8) for p in prompts]


def test_seeded_sampling_equals_generate(server, conn):
    """Sampling with a seed and top_n gives generate()'s tokens and probabilities, as logprobs."""
    r = server.client().completions.create(model=MODEL, prompt="I wish you", max_tokens=6, temperature=0.8,
                                           seed=7, logprobs=3, extra_body={"top_n": 10})
    rows = conn.execute(f"SELECT token, bytes, prob, alternatives FROM {MODEL}.generate(%s, 6, 0.8, 10, seed => 7, "
                        "logprobs => 3)", ["I wish you"]).fetchall()
    lp = r.choices[0].logprobs
    assert lp.token_ids == [t for t, *_ in rows]
    assert np.allclose(lp.token_logprobs, [np.log(p) for _, _, p, _ in rows])
    assert [len(top) for top in lp.top_logprobs] == [3] * len(rows)
    for top, (*_, alts) in zip(lp.top_logprobs, rows):
        assert np.allclose(sorted(top.values(), reverse=True), [a["logprob"] for a in alts])
    assert lp.text_offset[0] == len("I wish you")


def test_stop_string(server, conn):
    full = complete_sql(conn, "Happy New Year", 20)
    stop = full[3:5]
    r = server.client().completions.create(model=MODEL, prompt="Happy New Year", max_tokens=20, temperature=0,
                                           stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_streaming(server, conn):
    chunks = list(server.client().completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=10,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == complete_sql(conn, "The quick brown fox", 10)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] in ("stop", "length") and not any(reasons[:-1])
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert len([c for c in chunks if c.choices and c.choices[0].text]) >= 2  # token by token, not all at once


def test_stream_is_server_sent_events_ending_with_done(server):
    req = urllib.request.Request(server.url + "v1/completions", method="POST",
                                 data=json.dumps({"model": MODEL, "prompt": ["a", "b"], "max_tokens": 3,
                                                  "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    finals = [json.loads(e[6:])["choices"][0] for e in events[:-1]]
    assert sorted(c["index"] for c in finals if c["finish_reason"]) == [0, 1]


def test_embeddings_equal_embed(server, conn):
    texts = ["Happy New Year!", "the lazy dog"]
    r = server.client().embeddings.create(model=MODEL, input=texts)  # the client asks for base64
    want = [np.array(json.loads(conn.execute(f"SELECT {MODEL}.embed(%s)::text", [t]).fetchone()[0])) for t in texts]
    assert [d.index for d in r.data] == [0, 1]
    for d, w in zip(r.data, want):
        assert np.allclose(d.embedding, w, atol=1e-6)
    status, body = server.post("/v1/embeddings", {"model": MODEL, "input": "Happy New Year!",
                                                  "encoding_format": "float"})
    assert status == 200 and np.allclose(body["data"][0]["embedding"], want[0], atol=1e-6)
    assert body["usage"]["prompt_tokens"] == len(conn.execute(f"SELECT {MODEL}.tokenize(%s)",
                                                              ["Happy New Year!"]).fetchone()[0])


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi"}, "model"),
    ({"model": MODEL}, "prompt"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 64}, "max_tokens"),  # n_ctx is 64
    ({"model": MODEL, "prompt": "word " * 70, "max_tokens": 5}, "prompt"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, "temperature"),
    ({"model": MODEL, "prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"model": MODEL, "prompt": "hi", "top_n": 100000}, "top_n"),
    ({"model": MODEL, "prompt": "hi", "stop": ""}, "stop"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 99}, "logprobs"),
    ({"model": MODEL, "prompt": "hi", "n": 2}, "n"),
    ({"model": MODEL, "prompt": "a\x00b"}, "prompt"),
    ({"model": MODEL, "prompt": ["p"] * 33}, "prompt"),
    ({"model": MODEL, "prompt": [1, 2, 3]}, "prompt"),
])
def test_bad_parameter_is_400(server, body, param):
    status, out = server.post("/v1/completions", body)
    assert status == 400, out
    assert out["error"]["param"] == param and out["error"]["type"] == "invalid_request_error"
    assert set(out["error"]) == {"message", "type", "param", "code"}


def test_errors_through_the_client(server):
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    with pytest.raises(openai.NotFoundError) as e:
        server.client().completions.create(model="no_such_model", prompt="hi")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        server.client().embeddings.create(model="no_such_model", input="hi")


def test_not_json_and_too_large(server):
    status, out = server.post("/v1/completions", None, raw=b"{not json")
    assert status == 400 and "JSON" in out["error"]["message"]
    # a client announcing 2 MB: refused from the headers, before the body is read (as the server would have to)
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.putrequest("POST", "/v1/completions")
    c.putheader("Content-Type", "application/json")
    c.putheader("Content-Length", str(2 << 20))
    c.endheaders()
    c.send(b'{"model": "x", "prompt": "aaaa')
    r = c.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["message"]
    c.close()


def test_api_key_from_the_environment(dsn, load_tiny):
    load_tiny(MODEL, **SHAPE)
    s = start(dsn, "--model", MODEL, env={"GPT_SQL_API_KEY": "from-env"})
    try:
        status, out = s.post("/v1/embeddings", {"model": MODEL, "input": "hi"})
        assert status == 401
        status, out = s.post("/v1/embeddings", {"model": MODEL, "input": "hi"},
                             headers={"Authorization": "Bearer from-env"})
        assert status == 200
    finally:
        stop(s)


def test_only_json_and_only_local_names(server):
    """A page elsewhere can send a form or text/plain without asking (no CORS preflight): refused. A name pointed at
    127.0.0.1 by someone else (DNS rebinding): refused."""
    status, out = server.post("/v1/completions", {"model": MODEL, "prompt": "hi"},
                              headers={"Content-Type": "text/plain"})
    assert status == 415 and out["error"]["message"]
    status, out = server.post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1},
                              headers={"Host": "evil.example:80"})
    assert status == 421
    status, out = server.post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1},
                              headers={"Host": "localhost"})
    assert status == 200


def test_api_key(keyed):
    with pytest.raises(openai.AuthenticationError):
        keyed.client(key="wrong").models.list()
    status, out = keyed.post("/v1/completions", {"model": MODEL, "prompt": "hi"})
    assert status == 401 and out["error"]["code"] == "invalid_api_key"
    assert [m.id for m in keyed.client(key="sekrit").models.list().data] == [MODEL]
    r = keyed.client(key="sekrit").completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert r.usage.completion_tokens >= 1


def test_concurrent_requests_run_as_one_query(server, conn):
    """Requests that arrive together are gathered into one batched query: each gets what it gets alone."""
    prompts = ["Happy New Year", "The quick brown fox", "SELECT token", "I wish you", "naïve café"]
    results: dict[int, tuple[str, int]] = {}

    clients = [server.client() for _ in prompts]  # made first: the requests leave together

    def ask(k: int) -> None:
        raw = clients[k].completions.with_raw_response.create(model=MODEL, prompt=prompts[k], max_tokens=6,
                                                              temperature=0)
        results[k] = raw.parse().choices[0].text, int(raw.headers["x-gpt-sql-batch-prompts"])

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[k][0] for k in range(len(prompts))] == [complete_sql(conn, p, 6) for p in prompts]
    assert max(n for _, n in results.values()) > 1, results  # some ran together


def test_gathered_requests_share_the_idle_connections(server):
    """Four requests at once (sent back to back) on a server with two connections: two queries of two prompts."""
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    conns = [http.client.HTTPConnection(host, int(port), timeout=60) for _ in range(4)]
    for k, c in enumerate(conns):
        c.connect()
    for k, c in enumerate(conns):
        c.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                  body=json.dumps({"model": MODEL, "prompt": f"word {k}", "max_tokens": 4, "temperature": 0}))
    sizes = sorted(int(c.getresponse().headers["x-gpt-sql-batch-prompts"]) for c in conns)
    for c in conns:
        c.close()
    assert sizes == [2, 2, 2, 2]


def test_different_options_run_apart(server):
    """A request with other sampling options does not join a batch: its header counts its own prompts only."""
    raw = server.client().completions.with_raw_response.create(model=MODEL, prompt=["a", "b"], max_tokens=3,
                                                               temperature=0)
    assert raw.headers["x-gpt-sql-batch-prompts"] == "2"


def _active_backends(conn) -> list[int]:
    return [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'gpt-sql serve' "
                                       "AND state = 'active'")]


def _freed_after(conn, pids: list[int], limit_s: float = 5) -> float | None:
    """Seconds until none of the backends runs a statement, for 5 polls in a row (a cancelled query's cleanup,
    its ROLLBACK, is a statement too); None if that never happens within limit_s."""
    gone, quiet_since, quiet = time.monotonic(), None, 0
    while time.monotonic() - gone < limit_s:
        if set(pids) & set(_active_backends(conn)):
            quiet_since, quiet = None, 0
        else:
            quiet_since = quiet_since if quiet_since is not None else time.monotonic() - gone
            quiet += 1
            if quiet >= 5:
                return quiet_since
        time.sleep(0.03)
    return None


def test_disconnect_cancels_the_query(dsn, conn, load_tiny):
    """A client that goes away mid-generation (streamed or not): its query is cancelled and its backend is free
    within a second."""
    load_tiny("serve_slow", n_embd=64, n_head=4, n_layer=4, n_ctx=1024)
    slow = start(dsn, "--model", "serve_slow", env={"GPT_SQL_SERVE_SPLIT": "0"})  # gathered requests: one query
    host, port = slow.url.split("//")[1].rstrip("/").split(":")
    try:
        for stream in (True, False):
            c = http.client.HTTPConnection(host, int(port), timeout=30)
            c.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                      body=json.dumps({"model": "serve_slow", "prompt": "Happy New Year", "max_tokens": 900,
                                       "stream": stream}))
            deadline = time.monotonic() + 30
            while not _active_backends(conn) and time.monotonic() < deadline:
                time.sleep(0.05)
            pids = _active_backends(conn)
            assert pids, "the query never started"
            time.sleep(0.5)
            c.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-query
            c.close()
            freed = _freed_after(conn, pids)
            assert freed is not None, ("backend still busy 5 s after the client left: " +
                                       str(conn.execute("SELECT state, query FROM pg_stat_activity WHERE pid = ANY(%s)",
                                                        [pids]).fetchall())[:300])
            assert freed < 1.0, f"backend busy for {freed:.2f} s after the client left (stream={stream})"
        # two requests in one query (sent within the gathering window): the one that stays gets its whole completion
        body = {"model": "serve_slow", "max_tokens": 120, "temperature": 0}
        stays, leaves = (http.client.HTTPConnection(host, int(port), timeout=60) for _ in range(2))
        for c, prompt in ((stays, "I wish you"), (leaves, "Happy New Year")):
            c.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                      body=json.dumps({**body, "prompt": prompt}))
        deadline = time.monotonic() + 30
        while not _active_backends(conn) and time.monotonic() < deadline:
            time.sleep(0.05)
        leaves.sock.shutdown(socket.SHUT_RDWR)
        leaves.close()
        r = stays.getresponse()
        assert r.status == 200 and r.headers["x-gpt-sql-batch-prompts"] == "2"
        want = conn.execute("SELECT serve_slow.complete(%s, 120, top_n => 1)", ["I wish you"]).fetchone()[0]
        assert json.loads(r.read())["choices"][0]["text"] == want.split("<|endoftext|>")[0]
    finally:
        stop(slow)


def test_refuses_public_host_without_key(dsn, load_tiny):
    load_tiny(MODEL, **SHAPE)
    r = subprocess.run([sys.executable, "-m", "gpt_sql.runner.cli", "serve", "--host", "0.0.0.0", "--port", "0",
                        "--dsn", dsn, "--model", MODEL], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--api-key" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_port_in_use_is_one_line(server, dsn):
    port = server.url.rstrip("/").rsplit(":", 1)[1]
    r = subprocess.run([sys.executable, "-m", "gpt_sql.runner.cli", "serve", "--port", port, "--dsn", dsn,
                        "--model", MODEL], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "cannot listen on 127.0.0.1:" + port in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_help_mentions_the_insecure_flag():
    r = subprocess.run([sys.executable, "-m", "gpt_sql.runner.cli", "serve", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    for flag in ("--host", "--port", "--model", "--api-key", "--insecure-no-api-key", "--dsn"):
        assert flag in r.stdout


def test_page_and_static_files(server):
    with urllib.request.urlopen(server.url, timeout=10) as r:
        html = r.read().decode()
    assert "<html" in html.lower() or "<!doctype" in html.lower()
    assert "http://" not in html.replace(server.url, "") and "https://" not in html  # nothing from elsewhere


def test_readme_example_runs(server, capsys):
    """The README's Python example, as written, with the test server's address and model."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Serve"):]
    block = section[section.index("```python") + len("```python"):]
    code = block[:block.index("```")]
    assert 'base_url="http://127.0.0.1:8000/v1"' in code
    code = code.replace("http://127.0.0.1:8000/", server.url).replace("gpt2_124m", MODEL)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert len(scope["vectors"]) == 2 and len(scope["vectors"][0]) == SHAPE["n_embd"]
    assert capsys.readouterr().out.count("\n") >= 3
