"""Decode steps of several versions of sql/generate.sql, interleaved on one connection: which change cost what.

    python bench/compare_queries.py [--rounds 5] [--prompt-tokens 10] [--tokens 12] [--batch 1] REV_OR_FILE ...

    e.g. python bench/compare_queries.py 4efff75 f967e1a b630487 HEAD sql/generate.sql

Each argument is a git revision (its sql/generate.sql, from `git show`) or a file; its generate query is run. Every
round runs each version in turn, so a slow spell of the machine falls on all of them: a greedy generation of
--tokens tokens after a prompt of exactly --prompt-tokens tokens (--batch copies of it generated together), streamed
as the runner streams it, on the model `bench_124m` (bench/bench.py leaves it) with the helpers and tables of the
current schema (an old query that needs what the schema no longer has fails with PostgreSQL's message). With several
--model, each version runs on each model in turn (the same weights loaded by two versions of the loader, say).
Prints per version the decode step of each round (the median gap between rows; with --batch, the time after the
first step's rows over the steps after it) and the backend's CPU time per step, medians over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import prompt_of  # noqa: E402

from gpt_sql.runner.db import connect  # noqa: E402
from gpt_sql.runner.engine import Batch, prepare  # noqa: E402
from gpt_sql.runner.models import read_vocabulary  # noqa: E402
from gpt_sql.runner.queries import query as query_of  # noqa: E402
from gpt_sql.runner.tokenizer import Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def query_text(version: str) -> str:
    if Path(version).is_file():
        return Path(version).read_text()
    done = subprocess.run(["git", "-C", str(REPO), "show", f"{version}:sql/generate.sql"], capture_output=True,
                          text=True)
    if done.returncode:
        sys.exit(f"compare_queries: {version} is neither a file nor a git revision with sql/generate.sql")
    return done.stdout


def backend_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def decode_steps(conn, model: str, query: str, settings: dict, pid: int, batch: int,
                 tokens: int) -> tuple[float, float]:
    """(wall seconds, backend CPU seconds) per decode step of one streamed generation."""
    with conn.transaction():
        prepare(conn, model, settings, None)
        with conn.cursor(name="compare") as cur:
            cur.execute(query)
            arrivals, cpu_first = [], None
            while cur.fetchone() is not None:
                arrivals.append(time.perf_counter())
                if cpu_first is None:
                    cpu_first = backend_cpu_s(pid)
            cpu_last = backend_cpu_s(pid)
    steps = tokens - 1
    if batch == 1:
        wall = statistics.median(b - a for a, b in zip(arrivals, arrivals[1:]))
    else:
        wall = (arrivals[-1] - arrivals[batch - 1]) / steps
    return wall, (cpu_last - cpu_first) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("versions", nargs="+", help="git revisions or files of sql/generate.sql")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--prompt-tokens", type=int, default=10, help="prompt length in tokens (default 10)")
    ap.add_argument("--tokens", type=int, default=12, help="new tokens per generation (default 12)")
    ap.add_argument("--batch", type=int, default=1, help="copies of the prompt generated together (default 1)")
    ap.add_argument("--model", action="append", help="a loaded model; repeat for several (default bench_124m)")
    ap.add_argument("--dsn", help="server (default: the embedded one)")
    a = ap.parse_args()
    models = a.model or ["bench_124m"]
    if a.tokens < 2:
        sys.exit("compare_queries: --tokens must be at least 2 (a decode step follows the first token)")
    # the generate query of each version: one with psql branches after its `-- decode:` line gets them cut out
    queries = {v: query_of("generate", query_text(v)) for v in a.versions}
    conn = connect(a.dsn)
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    prompt = prompt_of(Tokenizer(*read_vocabulary(conn, models[0])), a.prompt_tokens)
    settings = Batch([prompt] * a.batch, tokens=a.tokens, top_n=1).settings()
    jobs = {(m, v): q for m in models for v, q in queries.items()}
    got: dict[tuple[str, str], list[tuple[float, float]]] = {k: [] for k in jobs}
    for _ in range(a.rounds):
        for (m, v), q in jobs.items():
            got[(m, v)].append(decode_steps(conn, m, q, settings, pid, a.batch, a.tokens))
    print(f"decode step after a {a.prompt_tokens}-token prompt, batch of {a.batch}, {a.rounds} interleaved rounds")
    print(f"| query | wall per step, each round (s) | median (s) | backend CPU per step, median (s) |\n|---|---|---:|---:|")
    for (m, v), runs in got.items():
        label = v if len(models) == 1 else f"{m}: {v}"
        walls = ", ".join(f"{w:.3f}" for w, _ in runs)
        print(f"| {label} | {walls} | {statistics.median(w for w, _ in runs):.3f} | "
              f"{statistics.median(c for _, c in runs):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
