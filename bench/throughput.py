"""Throughput of many prompts: batched in one query (and over --jobs connections) against one prompt at a time.

    python bench/throughput.py [--sizes 1,4,16,64] [--tokens 20] [--dtype float32] [--jobs 2] [--one-by-one 16]
    python bench/throughput.py --standby [--runs 1,2,4]

Loads a 124M-shaped model (random weights with OpenAI's tokenizer unless real ones are cached; see bench.py) into
the embedded server, once, as bench_124m (bench_124m_f16 with --dtype float16). For each batch size N it makes N
prompts of 5 to 60 tokens (evenly spread, cut from tinyshakespeare), greedy, --tokens new tokens each, and times:
the batch as one query on one connection; the batch over --jobs connections (for the sizes > --jobs); and, for
sizes up to --one-by-one, the same prompts one after another on one connection. Each run gets fresh connections,
whose private memory (RssAnon, not the shared buffers they read) is polled for its peak, summed over a run's
backends. Checks that every way gives the same tokens. Prints a markdown
table; tokens/s counts generated tokens.

--standby instead compares concurrent single generations on the primary and on a hot standby made from the
embedded binaries (runner/replica.py).
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
from bench import model, private_mb, prompt_of  # noqa: E402

from gpt_sql.loader.checkpoint import DTYPES, as_dtype  # noqa: E402
from gpt_sql.loader.load import load  # noqa: E402
from gpt_sql.runner.batch import Item, run_jobs  # noqa: E402
from gpt_sql.runner.db import connect, embedded_uri, fit_shared_buffers  # noqa: E402
from gpt_sql.runner.engine import Batch, NumpyEngine, Params, generate_sql  # noqa: E402
from gpt_sql.runner.models import model_names, read_vocabulary  # noqa: E402
from gpt_sql.runner.tokenizer import Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def prompts_of(tokenizer: Tokenizer, n: int, shortest: int = 5, longest: int = 60) -> list[str]:
    """n prompts whose lengths in tokens are spread evenly from shortest to longest, each cut from another place of
    the text."""
    text_file = REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt"
    text = text_file.read_text(encoding="utf-8") if text_file.exists() else "Happy New Year to all of you. " * 4000
    ids = tokenizer.encode(text[:400_000])
    lengths = [shortest + round((longest - shortest) * k / max(1, n - 1)) for k in range(n)]
    out, at = [], 0
    for length in lengths:
        for start in range(at, len(ids) - length):  # a cut that re-tokenizes to the same length
            prompt = tokenizer.decode(ids[start:start + length])
            if len(tokenizer.encode(prompt)) == length:
                out.append(prompt)
                at = start + length
                break
    assert len(out) == n, "the text is too short for these prompts"
    return out


class PeakMemory:
    """The peak private memory of each backend in `pids` (which may grow), polled while the block runs; `total`:
    their peaks, summed."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while True:
            for pid in list(self.pids):
                self.peaks[pid] = max(self.peaks.get(pid, 0.0), private_mb(pid) or 0.0)
            if self._stop.wait(0.02):
                return

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def total(self) -> float:
        return sum(self.peaks.values())


def run_batch(schema: str, prompts: list[str], tokens: int, jobs: int) -> tuple[float, dict[int, list[int]], float]:
    """The prompts as batches over `jobs` fresh connections: (seconds to the last token, tokens per prompt, the
    backends' peak private memory in MB, summed)."""
    items = [Item(i, p) for i, p in enumerate(prompts, 1)]
    greedy = Batch([], tokens, top_n=1)
    conns: list[psycopg.Connection] = []
    with PeakMemory() as memory:
        def new_connection() -> psycopg.Connection:
            conns.append(connect())
            memory.pids.append(conns[-1].info.backend_pid)
            return conns[-1]

        first = new_connection() if jobs == 1 else None
        t = time.perf_counter()
        got = {c.i: [tk.token for tk in c.tokens]
               for c in run_jobs(lambda: first or new_connection(), schema, items, jobs, greedy, 0)}
        wall = time.perf_counter() - t
    for conn in conns:
        conn.close()
    return wall, got, memory.total


def run_one_by_one(schema: str, prompts: list[str], tokens: int) -> tuple[float, dict[int, list[int]], float]:
    with connect() as conn, PeakMemory() as memory:
        memory.pids.append(conn.info.backend_pid)
        t = time.perf_counter()
        got = {i: [tk.token for tk in generate_sql(conn, schema, Params(p, tokens, 1.0, 1, 0))]
               for i, p in enumerate(prompts, 1)}
        wall = time.perf_counter() - t
    return wall, got, memory.total


def temp_bytes() -> int:
    with connect() as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        return int(conn.execute("SELECT temp_bytes FROM pg_stat_database WHERE datname = current_database()")
                   .fetchone()[0])


def batches(a: argparse.Namespace) -> int:
    ckpt, label, _ = model(None)
    schema = "bench_124m" + ("_f16" if a.dtype == "float16" else "")
    conn = connect()
    if schema not in model_names(conn):
        load(conn, as_dtype(ckpt, a.dtype), schema, progress=sys.stderr.isatty())
        note = fit_shared_buffers(conn)
        if note:
            print(f"throughput: {note}", file=sys.stderr)
    conn = connect()
    tokenizer = Tokenizer(*read_vocabulary(conn, schema))
    version = conn.execute("SELECT version()").fetchone()[0].split(",")[0]
    conn.close()
    run_batch(schema, prompts_of(tokenizer, 2), 2, 1)  # warm the caches
    rows = []
    for n in (int(x) for x in a.sizes.split(",")):
        prompts = prompts_of(tokenizer, n)
        ways = [("one query", lambda: run_batch(schema, prompts, a.tokens, 1))]
        if a.jobs > 1 and n > a.jobs:
            ways.append((f"--jobs {a.jobs}", lambda: run_batch(schema, prompts, a.tokens, a.jobs)))
        if n <= a.one_by_one:
            ways.append(("one by one", lambda: run_one_by_one(schema, prompts, a.tokens)))
        results = {}
        for way, run in ways:
            before = temp_bytes()
            wall, got, peak = run()
            results[way] = (wall, got, peak, temp_bytes() - before)
            print(f"throughput: {n} prompts, {way}: {wall:.1f} s", file=sys.stderr)
        tokens = {way: r[1] for way, r in results.items()}
        same = all(t == tokens["one query"] for t in tokens.values())
        base = results.get("one by one", (None,))[0]
        for way, (wall, got, peak, temp) in results.items():
            made = sum(len(t) for t in got.values())
            rows.append((n, way, wall, made / wall, f"{base / wall:.2f}x" if base else "", peak, temp, same))
    print(f"# gpt-sql throughput, many prompts\n\n- model: {label}, {a.dtype} weights; server: {version}\n"
          f"- prompts of 5 to 60 tokens, {a.tokens} new tokens each, greedy\n")
    print("| prompts | how | time to the last token (s) | tokens/s | against one by one | backend private peak (MB) "
          "| temporary files | same tokens |\n|---:|---|---:|---:|---:|---:|---:|---|")
    for n, way, wall, rate, ratio, peak, temp, same in rows:
        print(f"| {n} | {way} | {wall:.1f} | {rate:.2f} | {ratio} | {peak:.0f} | {temp / 2**20:.0f} MB | "
              f"{'yes' if same else 'NO'} |")
    return 0 if all(r[-1] for r in rows) else 1


def concurrent(dsns: list[str], prompts: list[str], tokens: int, schema: str) -> tuple[float, int]:
    """Run one generation per (dsn, prompt) at once; (wall seconds, tokens generated)."""
    counts = [0] * len(dsns)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with psycopg.connect(dsns[i], autocommit=True) as conn:
                counts[i] = sum(1 for _ in generate_sql(conn, schema, Params(prompts[i], tokens=tokens, top_n=1)))
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


def standby(a: argparse.Namespace) -> int:
    from gpt_sql.runner.replica import start_standby, stop_standby, wait_for_replay

    schema = "bench_124m"
    ckpt, label, _ = model(None)
    engine = NumpyEngine(ckpt)
    primary = embedded_uri(start=True)
    with connect() as conn:
        if schema not in model_names(conn):
            load(conn, ckpt, schema, progress=sys.stderr.isatty())
    prompts = [prompt_of(engine.tokenizer, 10 + i) for i in range(max(int(n) for n in a.runs.split(",")))]
    directory = Path(tempfile.mkdtemp(prefix="gpt-sql-standby-"))
    primary_socket = psycopg.conninfo.conninfo_to_dict(primary)["host"]
    standby_uri = start_standby(Path(primary_socket), directory / "data")
    try:
        with psycopg.connect(primary, autocommit=True) as p, psycopg.connect(standby_uri, autocommit=True) as s:
            wait_for_replay(p, s)
        both = f"postgresql://postgres@/postgres?host={primary_socket},{directory / 'data'}&load_balance_hosts=random"
        concurrent([primary, standby_uri], prompts[:2], 2, schema)  # warm both servers' caches
        rows = []
        for n in (int(x) for x in a.runs.split(",")):
            for where, dsns in (("primary", [primary] * n),
                                ("primary + standby, alternating", [(primary, standby_uri)[i % 2] for i in range(n)]),
                                ("multi-host DSN, load_balance_hosts=random", [both] * n)):
                wall, made = concurrent(dsns, prompts[:n], a.tokens, schema)
                rows.append((n, where, wall, made / wall))
    finally:
        stop_standby(directory / "data")
        if not a.keep_standby:
            shutil.rmtree(directory, ignore_errors=True)
    print(f"# gpt-sql throughput, primary and standby\n\n- model: {label}\n- {a.tokens} new tokens per generation, "
          f"greedy\n")
    print("| concurrent generations | where | wall (s) | tokens/s |\n|---:|---|---:|---:|")
    for n, where, wall, rate in rows:
        print(f"| {n} | {where} | {wall:.1f} | {rate:.2f} |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20, help="new tokens per prompt (default 20)")
    ap.add_argument("--sizes", default="1,4,16,64", help="batch sizes (default 1,4,16,64)")
    ap.add_argument("--dtype", choices=DTYPES, default="float32", help="how the weights are stored (default float32)")
    ap.add_argument("--jobs", type=int, default=2, help="connections for the --jobs runs (default 2; 1: none)")
    ap.add_argument("--one-by-one", type=int, default=64,
                    help="run the prompts one by one too for batch sizes up to this (default 64)")
    ap.add_argument("--standby", action="store_true", help="compare primary and hot standby instead")
    ap.add_argument("--runs", default="1,2,4", help="with --standby: numbers of concurrent generations")
    ap.add_argument("--keep-standby", action="store_true", help="with --standby: keep the standby's directory")
    a = ap.parse_args()
    return standby(a) if a.standby else batches(a)


if __name__ == "__main__":
    sys.exit(main())
