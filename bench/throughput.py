"""Throughput (tokens/s) of concurrent generations: on one server, and on the embedded primary plus a hot standby.

    python bench/throughput.py [--tokens 20] [--runs 1,2,4] [--keep-standby]

Loads the same 124M-shaped model as bench/bench.py into the embedded server, makes a standby of it from the
embedded binaries (runner/replica.py) in a temporary directory, and runs N generations at once (greedy, one
connection each, prompts cut from tinyshakespeare): first all on the primary, then spread over primary and
standby, alternating, and through a multi-host DSN with load_balance_hosts=random. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).parent))
from bench import model, prompt_of  # noqa: E402

from gpt_sql.loader.load import load  # noqa: E402
from gpt_sql.runner.db import connect, embedded_uri  # noqa: E402
from gpt_sql.runner.engine import NumpyEngine, Params, generate_sql  # noqa: E402
from gpt_sql.runner.replica import start_standby, stop_standby, wait_for_replay  # noqa: E402

SCHEMA = "bench_124m"


def concurrent(dsns: list[str], prompts: list[str], tokens: int) -> tuple[float, int]:
    """Run one generation per (dsn, prompt) at once; (wall seconds, tokens generated)."""
    counts = [0] * len(dsns)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with psycopg.connect(dsns[i], autocommit=True) as conn:
                counts[i] = sum(1 for _ in generate_sql(conn, SCHEMA, Params(prompts[i], tokens=tokens, top_n=1)))
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(dsns))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t, sum(counts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20, help="new tokens per generation")
    ap.add_argument("--runs", default="1,2,4", help="numbers of concurrent generations")
    ap.add_argument("--keep-standby", action="store_true", help="leave the standby's directory (default: removed)")
    a = ap.parse_args()

    ckpt, label = model(None)
    engine = NumpyEngine(ckpt)
    primary = embedded_uri(start=True)
    with connect() as conn:
        load(conn, ckpt, SCHEMA, progress=sys.stderr.isatty())
    prompts = [prompt_of(engine.tokenizer, 10 + i) for i in range(max(int(n) for n in a.runs.split(",")))]
    directory = Path(tempfile.mkdtemp(prefix="gpt-sql-standby-"))
    primary_socket = psycopg.conninfo.conninfo_to_dict(primary)["host"]
    standby = start_standby(Path(primary_socket), directory / "data")
    try:
        with psycopg.connect(primary, autocommit=True) as p, psycopg.connect(standby, autocommit=True) as s:
            wait_for_replay(p, s)
        both = f"postgresql://postgres@/postgres?host={primary_socket},{directory / 'data'}&load_balance_hosts=random"
        concurrent([primary, standby], prompts[:2], 2)  # warm both servers' caches
        rows = []
        for n in (int(x) for x in a.runs.split(",")):
            for where, dsns in (("primary", [primary] * n),
                                ("primary + standby, alternating", [(primary, standby)[i % 2] for i in range(n)]),
                                ("multi-host DSN, load_balance_hosts=random", [both] * n)):
                wall, made = concurrent(dsns, prompts[:n], a.tokens)
                rows.append((n, where, wall, made / wall))
    finally:
        stop_standby(directory / "data")
        if not a.keep_standby:
            shutil.rmtree(directory, ignore_errors=True)
    print(f"# gpt-sql throughput\n\n- model: {label}\n- {a.tokens} new tokens per generation, greedy\n")
    print("| concurrent generations | where | wall (s) | tokens/s |\n|---:|---|---:|---:|")
    for n, where, wall, rate in rows:
        print(f"| {n} | {where} | {wall:.1f} | {rate:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
