"""One long generation through the query: its steps, and the temporary files and memory it takes.

    python bench/long_generation.py [--prompt-tokens 10] [--tokens 600] [--runs 1] [--model bench_124m] [--query FILE]

Streams the query as the runner does (greedy) on a model already loaded (bench/bench.py leaves `bench_124m`),
with a prompt of exactly --prompt-tokens tokens cut from tinyshakespeare, and prints the prefill, the median,
last and slowest decode steps, the temporary files the query wrote (`temp_bytes` of pg_stat_database, so nothing
else may run on the database meanwhile), the backend's peak memory, the page faults of its decode steps and the
private memory it keeps after the run (when the server runs on this machine; the server's GLIBC_TUNABLES are
printed first). --runs N repeats the generation on the same connection: the first run in a backend faults in the
memory it grows to, later ones reuse what it kept. --query runs another version of sql/generate.sql
(for a before/after comparison).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).parent))
from bench import peak_rss_mb, private_mb, prompt_of  # noqa: E402

from gpt_sql.runner import queries  # noqa: E402
from gpt_sql.runner.db import connect  # noqa: E402
from gpt_sql.runner.engine import Params, prepare  # noqa: E402
from gpt_sql.runner.models import read_vocabulary  # noqa: E402
from gpt_sql.runner.tokenizer import Tokenizer  # noqa: E402


def temp_bytes(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT temp_bytes FROM pg_stat_database WHERE datname = current_database()").fetchone()[0]


PAGE = os.sysconf("SC_PAGE_SIZE")


def page_faults(pid: int) -> int | None:
    """Minor page faults of a process so far (memory it touched for the first time), on Linux."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return None


def server_tunables(conn: psycopg.Connection) -> str | None:
    """The GLIBC_TUNABLES the server's processes started with (on this machine), or None: which malloc setting a
    figure was measured under."""
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, entry in enumerate(environ):
        if entry.startswith("GLIBC_TUNABLES="):
            # glibc parses the variable in place, writing a NUL for each ':' there: the rest follows as entries of
            # their own, which (unlike a variable's name) start with "glibc."
            rest = environ[i + 1:]
            more = next((k for k, e in enumerate(rest) if not e.startswith("glibc.")), len(rest))
            return ":".join([entry.removeprefix("GLIBC_TUNABLES="), *rest[:more]])
    return "(glibc defaults)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=10, help="prompt length in tokens (default 10)")
    ap.add_argument("--tokens", type=int, default=600, help="new tokens (default 600)")
    ap.add_argument("--runs", type=int, default=1, help="times to run it on the same connection (default 1)")
    ap.add_argument("--model", default="bench_124m", help="a loaded model (default bench_124m, from bench/bench.py)")
    ap.add_argument("--query", help="another version of sql/generate.sql to run instead of the shipped one")
    ap.add_argument("--dsn", help="server (default: the embedded one)")
    a = ap.parse_args()
    if a.runs < 1 or a.tokens < 1 or a.prompt_tokens < 1:
        ap.error("--runs, --tokens and --prompt-tokens must be at least 1")

    conn = connect(a.dsn)
    prompt = prompt_of(Tokenizer(*read_vocabulary(conn, a.model)), a.prompt_tokens)
    query = Path(a.query).read_text(encoding="utf-8") if a.query else queries.query("generate")
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    print(f"server GLIBC_TUNABLES: {server_tunables(conn)}", flush=True)
    for run in range(1, a.runs + 1):
        before, times, faults = temp_bytes(conn), [], None
        with conn.transaction(), conn.cursor(name="long_generation") as cur:
            prepare(conn, a.model, Params(prompt, tokens=a.tokens, top_n=1).settings(), None)
            start = t = time.perf_counter()
            cur.execute(query)
            while cur.fetchone() is not None:
                now = time.perf_counter()
                if not times:
                    faults = page_faults(pid)  # from the first decode step on
                times.append(now - t)
                t = now
        total = time.perf_counter() - start
        end, after = page_faults(pid), private_mb(pid)
        faults = end - faults if faults is not None and end is not None else None
        time.sleep(0.6)  # the statistics collector's counters are flushed at most once a second or so
        written = temp_bytes(conn) - before
        steps = times[1:]
        print(f"run {run}: {a.tokens} tokens after a {a.prompt_tokens}-token prompt ({a.query or 'sql/generate.sql'}): "
              f"whole query {total:.1f} s; prefill {times[0]:.2f} s; decode step median {statistics.median(steps):.3f} s, "
              f"last ten {statistics.mean(steps[-10:]):.3f} s, slowest {max(steps):.2f} s; temporary files written "
              f"{written / 2**30:.2f} GB; backend peak memory {(peak_rss_mb(pid) or 0) / 1024:.2f} GB; page faults "
              f"in the decode steps {'n/a' if faults is None else f'{faults:,} ({faults * PAGE / 2**20:.0f} MB)'}; "
              f"backend private memory after the run {'n/a' if after is None else f'{after:.0f} MB'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
