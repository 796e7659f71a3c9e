"""`gpt-sql serve` under load: 8 concurrent completions against the same 8 one after another, and the time to the
first streamed token against the query's own prefill and `gpt-sql run`.

    python bench/serve.py [--size 124M|tiny] [--clients 8] [--tokens 20] [--runs 3] [--dsn DSN]

Loads the model into the embedded server once (bench_124m: random weights of GPT-2 124M's exact shapes with
OpenAI's tokenizer, as bench/throughput.py; tiny: a 4-layer model of 64 dims, for a loaded machine), starts
`gpt-sql serve --port 0` on it, and measures over HTTP with the standard library:
- the clients' prompts (5 to 60 tokens) sent at once, greedy, --tokens each: they gather into batched queries;
- the same prompts one after another; checks both give the same texts;
- time to the first streamed token of a 10-token prompt (the first SSE chunk with text), against the first row of
  the same query in-process (engine.generate_sql: its prefill) and the first token `gpt-sql run` prints (a new
  process: Python's start, the connection, then the same query).
Prints the load average before and after: on a shared machine, figures move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import model, prompt_of  # noqa: E402
from throughput import prompts_of  # noqa: E402

from gpt_sql.loader.load import load  # noqa: E402
from gpt_sql.runner.db import connect, embedded_uri, fit_shared_buffers  # noqa: E402
from gpt_sql.runner.engine import Params, generate_sql  # noqa: E402
from gpt_sql.runner.models import model_names, read_vocabulary  # noqa: E402
from gpt_sql.runner.tokenizer import Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def ensure_model(dsn: str, size: str) -> str:
    conn = connect(dsn)
    schema = "bench_124m" if size == "124M" else "bench_serve_tiny"
    if schema not in model_names(conn):
        sys.path.insert(0, str(REPO / "tests"))
        import tiny
        if not (tiny.SHARED_GPT2 / "encoder.json").exists():  # a git worktree sits deeper than ../shared
            tiny.SHARED_GPT2 = next((up / "shared" / "gpt2" for up in REPO.parents
                                     if (up / "shared" / "gpt2" / "encoder.json").exists()), tiny.SHARED_GPT2)
        if size == "124M":
            ckpt, label, _ = model(None, "124M")
        else:
            ckpt = tiny.make_checkpoint(n_embd=64, n_head=4, n_layer=4, n_ctx=256, scale=0.02,
                                        real_tokenizer=(tiny.SHARED_GPT2 / "encoder.json").exists())
            label = "tiny: 4 layers, 64 dims, random weights"
        print(f"loading {schema} ({label})", file=sys.stderr)
        load(conn, ckpt, schema)
        note = fit_shared_buffers(conn)
        if note:
            print(note, file=sys.stderr)
    conn.close()
    return schema


def start_server(dsn: str, schema: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "gpt_sql.runner.cli", "serve", "--port", "0", "--dsn", dsn,
                             "--model", schema], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        sys.exit(f"bench: the server did not start: {line!r}")
    return proc, line.split(" at ")[1].split()[0]


def complete(url: str, schema: str, prompt: str, tokens: int) -> str:
    body = json.dumps({"model": schema, "prompt": prompt, "max_tokens": tokens, "temperature": 0}).encode()
    req = urllib.request.Request(url + "v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())["choices"][0]["text"]


def concurrent(url: str, schema: str, prompts: list[str], tokens: int) -> tuple[float, list[str]]:
    out: list[str | None] = [None] * len(prompts)

    def one(k: int) -> None:
        out[k] = complete(url, schema, prompts[k], tokens)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(prompts))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t, out  # type: ignore[return-value]


def one_by_one(url: str, schema: str, prompts: list[str], tokens: int) -> tuple[float, list[str]]:
    t = time.perf_counter()
    out = [complete(url, schema, p, tokens) for p in prompts]
    return time.perf_counter() - t, out


def first_streamed(url: str, schema: str, prompt: str, tokens: int) -> float:
    body = json.dumps({"model": schema, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                       "stream": True}).encode()
    req = urllib.request.Request(url + "v1/completions", data=body, headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if first is None and line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                first = time.perf_counter() - t
    return first


def first_in_process(dsn: str, schema: str, prompt: str, tokens: int) -> float:
    conn = connect(dsn)
    t = time.perf_counter()
    stream = generate_sql(conn, schema, Params(prompt, tokens=tokens, top_n=1))
    next(stream)
    first = time.perf_counter() - t
    for _ in stream:
        pass
    conn.close()
    return first


def first_from_run(dsn: str, schema: str, prompt: str, tokens: int) -> float:
    """From starting `gpt-sql run` to the first byte after the prompt it echoes."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gpt_sql.runner.cli", "run", prompt, "--tokens", str(tokens),
                             "--top-n", "1", "--model", schema, "--dsn", dsn], stdout=subprocess.PIPE)
    want, got, first = len(prompt.encode()), 0, None
    while True:
        data = proc.stdout.read1(4096)
        if not data:
            break
        got += len(data)
        if first is None and got > want:
            first = time.perf_counter() - t
    proc.wait()
    return first


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--size", choices=("124M", "tiny"), default="124M")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3, help="time-to-first-token runs of each kind (median)")
    ap.add_argument("--dsn", help="server (default: the embedded one)")
    a = ap.parse_args()
    dsn = a.dsn or embedded_uri(start=True)
    schema = ensure_model(dsn, a.size)
    conn = connect(dsn)
    tokenizer = Tokenizer(*read_vocabulary(conn, schema))
    conn.close()
    prompts = prompts_of(tokenizer, a.clients)
    short = prompt_of(tokenizer, 10)
    print(f"load average before: {load_avg()} ({os.cpu_count()} cores)")
    proc, url = start_server(dsn, schema)
    try:
        complete(url, schema, "warm up", 2)
        t_conc, texts_conc = concurrent(url, schema, prompts, a.tokens)
        t_seq, texts_seq = one_by_one(url, schema, prompts, a.tokens)
        same = texts_conc == texts_seq
        print(f"{a.clients} completions of {a.tokens} tokens ({schema}): concurrent {t_conc:.2f} s, one after another "
              f"{t_seq:.2f} s: {t_seq / t_conc:.2f}x; same texts: {same}")
        ttft = {"served, first streamed token": [], "in-process query, first row (prefill)": [],
                "gpt-sql run, first token printed": []}
        for _ in range(a.runs):
            ttft["served, first streamed token"].append(first_streamed(url, schema, short, a.tokens))
            ttft["in-process query, first row (prefill)"].append(first_in_process(dsn, schema, short, a.tokens))
            ttft["gpt-sql run, first token printed"].append(first_from_run(dsn, schema, short, a.tokens))
        print(f"time to the first token of a 10-token prompt, median of {a.runs} (min-max):")
        for what, times in ttft.items():
            print(f"  {what:<40} {statistics.median(times):.3f} s ({min(times):.3f}-{max(times):.3f})")
    finally:
        proc.send_signal(2)
        proc.wait(timeout=30)
    print(f"load average after: {load_avg()}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
