"""Rows per second of `gpt-sql fill` on a GPT-2-shaped model: perplexity and embed with --jobs 1 and 2 against one
backend's UPDATE, and completions with --jobs 1 and 2 against complete() one row at a time.

    python bench/fill_bench.py [--texts 48] [--tokens 20] [--batch 8] [--dsn DSN]

Loads a 124M-shaped model (random weights with OpenAI's tokenizer unless real ones are cached; see bench.py) as
bench_124m when it is missing, like bench/throughput.py. The texts are 15 to 60 tokens, evenly spread, cut from
tinyshakespeare (bench/throughput.py's prompts_of), in a table made for the run and dropped after it. Each way
fills the same column from NULL; `gpt-sql fill` runs as a user runs it, in a process of its own, and its time is
the wall time of that process. Checks that every way writes the same values. Prints a markdown table.
fill_rows_per_second() is the measurement alone, to be merged into bench/bulk.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import model  # noqa: E402
from throughput import prompts_of  # noqa: E402

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from gpt_sql.loader.load import load  # noqa: E402
from gpt_sql.runner.db import connect, fit_shared_buffers  # noqa: E402
from gpt_sql.runner.models import model_names, read_vocabulary  # noqa: E402
from gpt_sql.runner.tokenizer import Tokenizer  # noqa: E402

TABLE = "fill_bench"
COLUMNS = {"perplexity": "ppl", "embed": "emb", "complete": "done"}
# complete()'s arguments as `gpt-sql fill complete` gives them: the row's seed from --seed 0 and its key
ROW_SEED = "('x' || left(md5('0:' || id::text), 16))::bit(64)::bigint"


def make_table(conn: psycopg.Connection, texts: list[str], n_embd: int) -> None:
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(TABLE)))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text, ppl float8, emb vector({}), done text)")
                 .format(sql.Identifier(TABLE), sql.Literal(n_embd)))
    with conn.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} (id, body) VALUES (%s, %s)").format(sql.Identifier(TABLE)),
                        list(enumerate(texts, 1)))


def clear(conn: psycopg.Connection, column: str) -> None:
    conn.execute(sql.SQL("UPDATE {} SET {} = NULL").format(sql.Identifier(TABLE), sql.Identifier(column)))
    conn.execute(sql.SQL("VACUUM {}").format(sql.Identifier(TABLE)))


def values(conn: psycopg.Connection, column: str) -> list:
    return conn.execute(sql.SQL("SELECT {}::text FROM {} ORDER BY id").format(
        sql.Identifier(column), sql.Identifier(TABLE))).fetchall()


def fill_rows_per_second(conn: psycopg.Connection, schema: str, task: str, jobs: int, dsn: str | None = None,
                         tokens: int = 20, batch: int = 8) -> tuple[float, float]:
    """`gpt-sql fill TASK --jobs N` over the bench table's column for TASK, emptied first: (rows/s, wall seconds of
    the process)."""
    column = COLUMNS[task]
    clear(conn, column)
    cmd = [sys.executable, "-m", "gpt_sql.runner.cli", "fill", task, "--table", TABLE, "--text", "body", "--into",
           column, "--model", schema, "--jobs", str(jobs), "--batch", str(batch), "--json"]
    cmd += ["--tokens", str(tokens)] if task == "complete" else []
    cmd += ["--dsn", dsn] if dsn else []
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"fill_bench: {' '.join(cmd)} failed: {r.stderr.strip()}")
    filled = json.loads(r.stdout)["filled"]
    return filled / wall, wall


def one_backend_rows_per_second(conn: psycopg.Connection, schema: str, task: str,
                                tokens: int = 20) -> tuple[float, float]:
    """The column filled by one UPDATE calling the model's function row by row, in one backend: (rows/s, seconds)."""
    column = COLUMNS[task]
    clear(conn, column)
    m = sql.Identifier(schema)
    call = {"perplexity": sql.SQL("{}.perplexity(body)").format(m), "embed": sql.SQL("{}.embed(body)").format(m),
            "complete": sql.SQL("{}.complete(body, {}, seed => " + ROW_SEED + ")").format(m, sql.Literal(tokens))}[task]
    t = time.perf_counter()
    n = conn.execute(sql.SQL("UPDATE {} SET {} = {}").format(sql.Identifier(TABLE), sql.Identifier(column), call)
                     ).rowcount
    wall = time.perf_counter() - t
    return n / wall, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--texts", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=20, help="new tokens per completion (default 20)")
    ap.add_argument("--batch", type=int, default=8, help="fill's --batch (default 8)")
    ap.add_argument("--dsn", help="server (default: the embedded one)")
    a = ap.parse_args()

    schema = "bench_124m"
    conn = connect(a.dsn)
    if schema not in model_names(conn):
        ckpt, _, _ = model(None)
        load(conn, ckpt, schema, progress=sys.stderr.isatty())
        note = fit_shared_buffers(conn) if a.dsn is None else None
        if note:
            print(f"fill_bench: {note}", file=sys.stderr)
        conn = connect(a.dsn)
    tokenizer = Tokenizer(*read_vocabulary(conn, schema))
    n_embd = conn.execute(sql.SQL("SELECT n_embd FROM {}.hparams").format(sql.Identifier(schema))).fetchone()[0]
    make_table(conn, prompts_of(tokenizer, a.texts, 15, 60), n_embd)
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    rows = []
    try:
        one_backend_rows_per_second(conn, schema, "perplexity")  # warm the caches
        for task in ("perplexity", "embed", "complete"):
            ways = {"one backend, UPDATE ... = f(body)": lambda: one_backend_rows_per_second(conn, schema, task,
                                                                                             a.tokens)}
            for jobs in (1, 2):
                ways[f"gpt-sql fill --jobs {jobs}"] = lambda jobs=jobs: fill_rows_per_second(
                    conn, schema, task, jobs, a.dsn, a.tokens, a.batch)
            got = {}
            for way, run in ways.items():
                per_s, wall = run()
                got[way] = values(conn, COLUMNS[task])
                rows.append((task, way, wall, per_s))
                print(f"fill_bench: {task}, {way}: {wall:.1f} s", file=sys.stderr)
            same = all(v == next(iter(got.values())) for v in got.values())
            rows.append((task, "same values every way", None, same))
    finally:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(TABLE)))
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    print(f"# gpt-sql fill: rows per second\n\n- model: {schema}; {a.texts} texts of 15-60 tokens; completions of "
          f"{a.tokens} tokens (temperature 1, top_n 5); fill --batch {a.batch}; {os.cpu_count()} cores\n"
          f"- load average before {' '.join(load_before)}, after {' '.join(load_after)}\n")
    print("| task | way | seconds | rows/s |\n|---|---|---:|---:|")
    for task, way, wall, per_s in rows:
        if wall is None:
            print(f"| {task} | {way} | | {'yes' if per_s else 'NO'} |")
        else:
            print(f"| {task} | {way} | {wall:.1f} | {per_s:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
