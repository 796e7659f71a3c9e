"""Benchmark: gpt-sql on a GPT-2-shaped model (124M by default) against the NumPy reference, side by side.

    python bench/bench.py [--size 124M|355M|774M|1558M] [--dtype float32|float16] [--checkpoint DIR] [--dsn DSN]

Uses real GPT-2 weights when given (or found in the download cache); otherwise random weights of exactly the
size's shapes with OpenAI's tokenizer from ../shared/gpt2, and says so (written to a temporary Hugging Face
checkpoint, so that the load is `gpt-sql load` in a process of its own, timed and with its peak memory). Prints a
markdown table and writes it, with the raw figures, to the output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

from psycopg import sql

from gpt_sql.loader.checkpoint import DTYPES, as_dtype, read_checkpoint
from gpt_sql.loader.download import default_cache_dir
from gpt_sql.loader.hf_format import write_hf
from gpt_sql.runner.db import connect
from gpt_sql.runner.engine import NumpyEngine, Params, Token, generate_sql
from gpt_sql.runner.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


# GPT-2's four sizes: n_embd, n_head, n_layer (n_ctx 1024, OpenAI's 50,257-token vocabulary)
SIZES = {"124M": (768, 12, 12), "355M": (1024, 16, 24), "774M": (1280, 20, 36), "1558M": (1600, 25, 48)}


def model(checkpoint: str | None, size: str = "124M"):
    """(checkpoint, label, its directory or None for random weights made in memory)."""
    if checkpoint:
        return read_checkpoint(checkpoint), "real weights: " + checkpoint, Path(checkpoint)
    cached = default_cache_dir() / size
    if (cached / "model.ckpt.index").exists():
        return read_checkpoint(cached), f"real weights: GPT-2 {size} from {cached}", cached
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import SHARED_GPT2, make_checkpoint

    if not (SHARED_GPT2 / "encoder.json").exists():
        sys.exit("bench: no GPT-2 checkpoint and no ../shared/gpt2 tokenizer; pass --checkpoint DIR")
    n_embd, n_head, n_layer = SIZES[size]
    ckpt = make_checkpoint(n_embd=n_embd, n_head=n_head, n_layer=n_layer, n_ctx=1024, real_tokenizer=True,
                           scale=0.02, seed=0)
    return (ckpt, f"RANDOM weights with the exact GPT-2 {size} shapes and OpenAI's tokenizer (no real weights here)",
            None)


def cli_load(path: Path, schema: str, dtype: str, dsn: str | None) -> tuple[float, float | None]:
    """`gpt-sql load` as a user runs it, in a process of its own: (wall seconds, its peak resident MB). The peak is
    the child's own VmHWM, polled: getrusage's ru_maxrss would carry this process's peak across fork and exec."""
    cmd = [sys.executable, "-m", "gpt_sql.runner.cli", "load", str(path), "--name", schema, "--dtype", dtype]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd + (["--dsn", dsn] if dsn else []), stdout=subprocess.DEVNULL)
    peak = None
    while proc.poll() is None:
        peak = max(peak or 0, peak_rss_mb(proc.pid) or 0) or None
        time.sleep(0.02)
    if proc.returncode:
        sys.exit(f"bench: {' '.join(cmd)} failed with exit code {proc.returncode}")
    return time.perf_counter() - t, peak


def prompt_of(tokenizer: Tokenizer, n_tokens: int) -> str:
    """A prompt of exactly n_tokens tokens, cut from public-domain text (or a repeated sentence)."""
    text_file = REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt"
    text = text_file.read_text(encoding="utf-8") if text_file.exists() else "Happy New Year to all of you. " * 400
    ids = tokenizer.encode(text[: n_tokens * 8])[:n_tokens]
    prompt = tokenizer.decode(ids)
    assert len(tokenizer.encode(prompt)) == n_tokens, "re-tokenizing the cut changed its length"
    return prompt


def timed(tokens: Iterable[Token]) -> tuple[list[float], list[int]]:
    """Seconds from the start to the first token (prefill), then between consecutive tokens; and the tokens."""
    times, ids, t = [], [], time.perf_counter()
    for token in tokens:
        now = time.perf_counter()
        times.append(now - t)
        ids.append(token.token)
        t = now
    return times, ids


def sql_timings(conn, schema: str, prompt: str, n_new: int) -> tuple[list[float], list[int]]:
    return timed(generate_sql(conn, schema, Params(prompt, tokens=n_new, top_n=1)))


def numpy_timings(engine: NumpyEngine, prompt: str, n_new: int) -> tuple[list[float], list[int]]:
    return timed(engine.generate(Params(prompt, tokens=n_new, top_n=1)))


def status_mb(pid: int, field: str) -> float | None:
    """A memory figure of a process from /proc/PID/status (kB there), in MB, on Linux; None where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_rss_mb(pid: int) -> float | None:
    """A process's peak resident memory (VmHWM)."""
    return status_mb(pid, "VmHWM")


def private_mb(pid: int) -> float | None:
    """A process's private memory now (RssAnon: its heap and other anonymous memory). Not Private_Dirty, which also
    counts the pages of the shared buffers that no other process has mapped: after one call on a 124M model, 650 MB
    of weights that this backend alone has read."""
    return status_mb(pid, "RssAnon")


def backend_peak_rss_mb(conn) -> float | None:
    """Peak resident memory of this connection's backend, when the server runs on this machine."""
    return peak_rss_mb(conn.execute("SELECT pg_backend_pid()").fetchone()[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--checkpoint", help="GPT-2 124M checkpoint dir (default: download cache, else random weights)")
    ap.add_argument("--dsn", help="server (default: the embedded one)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="where to write bench[_f16].json and .md")
    ap.add_argument("--positions", default="10,100,490", help="prompt lengths: prefill and the decode steps after it")
    ap.add_argument("--steps", type=int, default=11, help="decode steps timed per prompt length (median reported)")
    ap.add_argument("--dtype", choices=DTYPES, default="float32", help="how the weights are stored (default float32)")
    ap.add_argument("--size", choices=SIZES, default="124M", help="GPT-2 size (random weights of its exact shapes "
                                                                 "unless --checkpoint or the download cache has it)")
    a = ap.parse_args()

    ckpt, label, path = model(a.checkpoint, a.size)
    schema = f"bench_{a.size.lower()}" + ("_f16" if a.dtype == "float16" else "")
    connect(a.dsn)  # start the embedded server before the load is timed
    with tempfile.TemporaryDirectory(prefix="gpt-sql-bench-") as tmp:
        if path is None:  # random weights: written as a Hugging Face checkpoint, so the load is the CLI's
            write_hf(ckpt, Path(tmp))
            path = Path(tmp)
        # the CLI's load: streamed tensor by tensor, then shared buffers sized to the models (embedded server)
        load_s, load_peak = cli_load(path, schema, a.dtype, a.dsn)
    ckpt = as_dtype(ckpt, a.dtype)
    engine = NumpyEngine(ckpt)
    conn = connect(a.dsn)
    size = int(conn.execute("SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                            "WHERE c.relnamespace = %s::regnamespace", (schema,)).fetchone()[0])
    run = connect(a.dsn)  # a fresh backend, so its peak memory is this benchmark's
    sql_timings(run, schema, prompt_of(engine.tokenizer, 5), 2)  # warm the caches once

    # One generation per prompt length: its first row's arrival is the prefill, the gaps after it the decode steps
    rows, raw, decode, same = [], {}, {}, []
    positions = [int(x) for x in a.positions.split(",")]
    for pos in positions:
        p = prompt_of(engine.tokenizer, pos)
        (s, sql_ids), (n_, numpy_ids) = sql_timings(run, schema, p, a.steps + 1), numpy_timings(engine, p, a.steps + 1)
        same.append(sql_ids == numpy_ids)
        rows.append((f"prefill, {pos}-token prompt (time to the first token)", s[0], n_[0]))
        decode[pos] = (statistics.median(s[1:]), statistics.median(n_[1:]))
        raw[f"prompt_{pos}"] = {"sql_s": s, "numpy_s": n_}
    for pos in positions:
        rows.append((f"decode step after a {pos}-token prompt (median of {a.steps})", *decode[pos]))
    # the same generation called as a SQL function from an ordinary query, against the query through settings
    p, n_new = prompt_of(engine.tokenizer, positions[0]), a.steps + 1
    complete = sql.SQL("SELECT {}.complete(%s, %s, 1, 1)").format(sql.Identifier(schema))
    run.execute(complete, (p, 2)).fetchone()  # a session plans a function's query at its first call
    t = time.perf_counter()
    run.execute(complete, (p, n_new)).fetchone()
    function_s = time.perf_counter() - t
    query_s = sum(sql_timings(run, schema, p, n_new)[0])
    numpy_s = sum(numpy_timings(engine, p, n_new)[0])
    rows.append((f"{n_new} tokens after a {positions[0]}-token prompt, the query (settings, streamed)", query_s, numpy_s))
    rows.append((f"the same from `SELECT {schema}.complete(prompt, {n_new}, 1, 1)`", function_s, numpy_s))
    first = positions[0]
    ratios = [f"decode step after {pos} tokens / after {first}: SQL {decode[pos][0] / decode[first][0]:.2f}x, "
              f"NumPy {decode[pos][1] / decode[first][1]:.2f}x" for pos in positions[1:]]
    peak = backend_peak_rss_mb(run)

    lines = ["# gpt-sql benchmark", "", f"- model: {label} ({ckpt.n_params:,} parameters, {a.dtype} weights)",
             f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
             f"server: {run.execute('SELECT version()').fetchone()[0].split(',')[0]}",
             f"- `gpt-sql load`: {load_s:.1f} s; database size: {size / 2**20:.0f} MB; "
             f"peak memory of the load process: {load_peak or 0:.0f} MB; "
             f"peak backend memory: {peak or 0:.0f} MB",
             "", "| measurement | SQL (s) | NumPy (s) | SQL/NumPy |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {s:.3f} | {n:.4f} | {s / n:.1f}x |" for name, s, n in rows]
    lines += [""] + [f"- {r}" for r in ratios]
    lines += [f"- greedy tokens equal to NumPy's: {sum(same)} of {len(same)} generations"]
    report = "\n".join(lines) + "\n"
    print(report)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench" + ("" if a.size == "124M" else f"_{a.size}") + ("_f16" if a.dtype == "float16" else "")
    (out / f"{stem}.md").write_text(report)
    (out / f"{stem}.json").write_text(json.dumps({
        "model": label, "n_params": ckpt.n_params, "dtype": a.dtype, "load_s": load_s, "db_size_bytes": size,
        "load_peak_rss_mb": load_peak,
        "peak_backend_rss_mb": peak, "numpy_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "rows": [{"name": n, "sql_s": s, "numpy_s": np_} for n, s, np_ in rows], "raw": raw}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
