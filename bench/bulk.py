"""Bulk work over a table: a model function over 48 texts through one backend, through parallel workers, and the
NumPy reference beside them.

    python bench/bulk.py [--model bench_124m] [--rows 48] [--tasks perplexity,embed] [--methods ...] [--dsn DSN]

Loads a 124M-shaped model (random weights with OpenAI's tokenizer unless real ones are cached; see bench.py) as
bench_124m when it is missing, and leaves it loaded for the next run (`gpt-sql drop bench_124m` removes it). Makes
a table of --rows texts of 15 to 60 tokens (evenly spread, cut from tinyshakespeare), one row a page (a pad and
fillfactor 10) with `parallel_workers = 2`, and drops it at the end. Then, for each task, each method in turn:

- one backend: `SELECT id, f(body) FROM t` with max_parallel_workers_per_gather = 0;
- parallel: the same statement with max_parallel_workers_per_gather = 2 (checked: a Gather is planned, and
  pg_stat_database counts the workers launched); `parallel: 1 worker`: the same with one worker beside the leader;
- numpy: N BLAS threads: the reference (runner/reference.py) in a process of its own with OPENBLAS_NUM_THREADS=N.

Each method is a function of (Setup, task) -> Result in METHODS, so another way to fill the column is one more
function there. Prints one markdown table: seconds, rows/s, the speed-up over one backend, and how far each
method's values are from one backend's (0 = the same bits).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from pgvector.psycopg import register_vector
from psycopg import sql

sys.path.insert(0, str(Path(__file__).parent))
from bench import model  # noqa: E402
from throughput import prompts_of  # noqa: E402

from gpt_sql.loader.load import load  # noqa: E402
from gpt_sql.runner.db import connect, fit_shared_buffers  # noqa: E402
from gpt_sql.runner.models import model_names, read_vocabulary  # noqa: E402
from gpt_sql.runner.tokenizer import Tokenizer  # noqa: E402

TABLE = "bulk_bench_texts"
TASKS = ("perplexity", "embed")
# a pad that keeps each row over half of what fillfactor 10 lets a page hold (819 bytes): one row a page, so that a
# parallel scan, which hands out pages, has a page for each call to hand out
PAD = 600


@dataclass
class Setup:
    dsn: str | None
    model: str
    texts: list[str]  # by id - 1
    table: str = TABLE


@dataclass
class Result:
    seconds: float
    values: dict[int, object]  # id -> the method's value for that row
    note: str = ""
    extra: dict = field(default_factory=dict)


def make_table(conn, texts: list[str], table: str = TABLE) -> int:
    """The texts as rows (id from 1), one a page; returns the table's pages."""
    t = sql.Identifier(table)
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(t))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text NOT NULL, pad text NOT NULL)"
                         " WITH (fillfactor = 10, parallel_workers = 2)").format(t))
    with conn.cursor().copy(sql.SQL("COPY {} (id, body, pad) FROM STDIN").format(t)) as copy:
        for i, text in enumerate(texts, 1):
            copy.write_row((i, text, "." * PAD))
    conn.execute(sql.SQL("VACUUM ANALYZE {}").format(t))
    return conn.execute("SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::int",
                        (table,)).fetchone()[0]


def select_statement(s: Setup, task: str) -> sql.Composed:
    """The statement a user writes: no ORDER BY, which would make the planner read the rows in the key's order
    through a parallel index scan, whose one leaf page goes to one process."""
    return sql.SQL("SELECT id, {}.{}(body) FROM {}").format(sql.Identifier(s.model), sql.Identifier(task),
                                                           sql.Identifier(s.table))


def workers_launched(dsn: str | None) -> int:
    """Parallel workers this database has launched so far (PostgreSQL 18's pg_stat_database), as a new session
    sees the statistics."""
    with connect(dsn) as conn:
        return conn.execute("SELECT parallel_workers_launched FROM pg_stat_database"
                            " WHERE datname = current_database()").fetchone()[0]


def through_sql(s: Setup, task: str, workers: int) -> Result:
    """The SELECT on a fresh connection with max_parallel_workers_per_gather = workers (0: one backend)."""
    before = workers_launched(s.dsn)
    with connect(s.dsn) as conn:
        register_vector(conn)  # embed's vectors as NumPy arrays
        conn.execute("SELECT set_config('max_parallel_workers_per_gather', %s, false)", (str(workers),))
        if workers:
            conn.execute(sql.SQL("ALTER TABLE {} SET (parallel_workers = {})").format(
                sql.Identifier(s.table), sql.Literal(workers)))
        statement = select_statement(s, task)
        plan = "\n".join(r[0] for r in conn.execute(sql.SQL("EXPLAIN ") + statement))
        if workers and "Gather" not in plan:
            sys.exit(f"bulk: no Gather in the plan of {statement.as_string(conn)}:\n{plan}")
        t = time.perf_counter()
        rows = conn.execute(statement).fetchall()
        seconds = time.perf_counter() - t
    # the leader's counts reach the shared statistics when its session ends (or within seconds)
    deadline, launched = time.monotonic() + 10, 0
    while workers and not launched and time.monotonic() < deadline:
        time.sleep(0.2)
        launched = workers_launched(s.dsn) - before
    values = {i: v.to_numpy().astype(np.float64) if task == "embed" else v for i, v in rows}
    note = f"{launched} worker{'' if launched == 1 else 's'} launched" if workers else ""
    return Result(seconds, values, note, {"plan": plan})


def numpy_reference(s: Setup, task: str, threads: int) -> Result:
    """The reference in a process of its own (BLAS reads its thread count when NumPy loads), timed there."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, __file__, "--numpy-worker", task, "--model", s.model]
                          + (["--dsn", s.dsn] if s.dsn else []),
                          input=json.dumps(s.texts), capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"bulk: the NumPy reference failed:\n{done.stderr}")
    out = json.loads(done.stdout)
    values = {i: np.asarray(v, dtype=np.float64) if task == "embed" else v for i, v in enumerate(out["values"], 1)}
    return Result(out["seconds"], values)


def numpy_worker(task: str) -> None:
    """--numpy-worker: the texts (JSON on stdin) through the reference; their values and the seconds on stdout."""
    ckpt, _, _ = model(None)
    from gpt_sql.runner.engine import NumpyEngine

    engine = NumpyEngine(ckpt)
    texts = json.loads(sys.stdin.read())
    t = time.perf_counter()
    if task == "perplexity":
        values = [float(np.exp(-np.mean([lp for _, lp in engine.score(text)]))) for text in texts]
    else:
        values = [engine.embed(text).tolist() for text in texts]
    print(json.dumps({"seconds": time.perf_counter() - t, "values": values}))


# name -> how it computes a task over the table. `gpt-sql fill --jobs 2` belongs here too (bench/bulk.py is shared
# with it): a function that fills a column of a copy of the table and reads the values back.
METHODS: dict[str, Callable[[Setup, str], Result]] = {
    "one backend": lambda s, task: through_sql(s, task, 0),
    "parallel: 1 worker": lambda s, task: through_sql(s, task, 1),
    "parallel: 2 workers": lambda s, task: through_sql(s, task, 2),
    "numpy: 1 BLAS thread": lambda s, task: numpy_reference(s, task, 1),
    "numpy: 2 BLAS threads": lambda s, task: numpy_reference(s, task, 2),
}
BASELINE = "one backend"


def difference(a: object, b: object) -> float:
    """How far value a is from b: the largest absolute difference, relative to b's largest magnitude."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300))


def report(results: dict[tuple[str, str], Result], n_rows: int) -> str:
    lines = ["| task | method | seconds | rows/s | vs one backend | values vs one backend | note |",
             "|---|---|---:|---:|---:|---|---|"]
    for (task, method), r in results.items():
        base = results.get((task, BASELINE))
        speedup = f"{base.seconds / r.seconds:.2f}x" if base else ""
        if base is None or method == BASELINE:
            diff = ""
        else:
            worst = max(difference(r.values[i], base.values[i]) for i in base.values)
            diff = "the same bits" if all(np.array_equal(np.asarray(r.values[i]), np.asarray(base.values[i]))
                                          for i in base.values) else f"max relative difference {worst:.1e}"
        lines.append(f"| {task} | {method} | {r.seconds:.1f} | {n_rows / r.seconds:.2f} | {speedup} | {diff} "
                     f"| {r.note} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--model", default="bench_124m", help="a loaded model, or bench_124m (loaded when missing)")
    ap.add_argument("--rows", type=int, default=48, help="texts in the table (default 48)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"of {', '.join(TASKS)} (default both)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"of: {', '.join(METHODS)} (default all)")
    ap.add_argument("--dsn", help="server (default: the embedded one)")
    ap.add_argument("--numpy-worker", choices=TASKS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.numpy_worker:
        numpy_worker(a.numpy_worker)
        return 0
    tasks, methods = a.tasks.split(","), a.methods.split(",")
    for name, known in (("task", TASKS), ("method", METHODS)):
        unknown = [x for x in (tasks if name == "task" else methods) if x not in known]
        if unknown:
            ap.error(f"no {name} {', '.join(unknown)}; choose from {', '.join(known)}")

    conn = connect(a.dsn)
    if a.model not in model_names(conn):
        ckpt, _, _ = model(None)
        load(conn, ckpt, a.model, progress=sys.stderr.isatty())
        fit_shared_buffers(conn)
        conn = connect(a.dsn)
    encoder, merges = read_vocabulary(conn, a.model)
    texts = prompts_of(Tokenizer(encoder, merges), a.rows, 15, 60)
    setup = Setup(a.dsn, a.model, texts)
    results: dict[tuple[str, str], Result] = {}
    try:
        pages = make_table(conn, texts)
        with connect(a.dsn) as warm:  # the model's pages into the shared buffers before anything is timed
            warm.execute(sql.SQL("SELECT {}.perplexity(body) FROM {} WHERE id = 1").format(
                sql.Identifier(a.model), sql.Identifier(TABLE)))
        for task in tasks:
            for method in methods:
                results[(task, method)] = METHODS[method](setup, task)
                print(f"{task}, {method}: {results[(task, method)].seconds:.1f} s", file=sys.stderr)
    finally:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(TABLE)))
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# bulk: {a.rows} texts of 15-60 tokens on {pages} pages, model {a.model}\n\n"
          f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average at the "
          f"end {load_avg}; server: {conn.execute('SELECT version()').fetchone()[0].split(',')[0]}\n")
    print(report(results, a.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
