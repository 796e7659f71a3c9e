"""Soak: a pool of long-lived connections, as an application holds them, running mixed calls for minutes.

    python bench/soak.py [--minutes 10] [--calls 200] [--pool-size 8] [--seed 0] [--keep] [--dsn DSN]

Loads a 124M-shaped model (random weights with OpenAI's tokenizer unless real ones are cached; see bench.py) as
`soak_124m`, unless it is loaded already. Then --calls calls, spread evenly over --minutes and run by a
psycopg_pool.ConnectionPool of --pool-size connections: the model's SQL functions generate(), complete() and
next_tokens() (and the text[] overloads of generate() and complete()) and the runner's streaming path
(generate_sql: rows from a server-side cursor), on short prompts (5 to 40 tokens) and 490-token ones; some of them
cancelled by a statement_timeout set for that call, some by the client going away while rows stream (it closes the
connection between two rows, or its socket is shut down while the next row is being computed, as when the
client's process dies). Before the soak, each distinct call runs once alone on a plain connection: every call that
completes in the pool must give the same tokens, and a cancelled stream a prefix of them.

Prints markdown tables: calls done and errors by kind (expected cancellations apart from anything unexpected),
p50/p95 latency per kind of call, each pooled backend's private memory (RssAnon: its heap, not the shared buffers
it reads) after its calls and idle at the end, and the server's total (RssAnon summed over all its processes,
shared buffers apart), its peak during the soak and idle at the end. Exits 1 on anything unexpected: an error that
was not an asked-for cancellation, different tokens, a backend left running after its client went away, a server
restart, a crash or out-of-memory line in the embedded server's log, or memory over --max-idle-mb / --max-server-mb.
Drops `soak_124m` at the end unless --keep.
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import socket
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).parent))
from bench import model, private_mb  # noqa: E402
from throughput import prompts_of  # noqa: E402

from gpt_sql.loader.load import drop, load  # noqa: E402
from gpt_sql.runner.db import connect, embedded_uri, fit_shared_buffers, pgdata_dir, resolve_dsn  # noqa: E402
from gpt_sql.runner.engine import GenerationError, Params, generate_sql  # noqa: E402
from gpt_sql.runner.models import model_names, read_vocabulary  # noqa: E402
from gpt_sql.runner.tokenizer import Tokenizer  # noqa: E402

SCHEMA = "soak_124m"
APP = "gpt-sql-soak"  # application_name of the pool's connections
LONG = 490  # tokens in a long prompt
MB = 2**20


# --- the calls ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """One distinct call: the same Spec gives the same result on any connection."""
    kind: str  # generate, complete, next_tokens, generate[], complete[], stream
    size: str  # short, long: the prompt's length
    prompts: tuple[str, ...]
    tokens: int = 8
    temperature: float = 1.0
    top_n: int = 5
    seeds: tuple[int, ...] = (0,)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.size}" + (f" x{len(self.prompts)}" if len(self.prompts) > 1 else "")


@dataclass(frozen=True)
class Call:
    spec: Spec
    mode: str = "normal"  # normal; timeout (statement_timeout); close, kill (the client goes away mid-stream)
    timeout_s: float | None = None
    after_rows: int = 0  # close/kill: rows received before the client goes away

    @property
    def label(self) -> str:
        if self.mode == "timeout":
            what = f", statement_timeout {self.timeout_s:g} s"
        elif self.mode in ("close", "kill"):
            how = "client closes" if self.mode == "close" else "socket shut down"
            what = f", {how} after {self.after_rows} rows"
        else:
            what = ""
        return self.spec.label + what


@dataclass
class Outcome:
    call: Call
    status: str  # ok, cancelled (as asked), unexpected
    seconds: float
    detail: str = ""
    pid: int | None = None
    anon_mb: float | None = None  # the backend's private memory right after the call, if it lives on


def query_of(spec: Spec) -> tuple[sql.Composed, list]:
    """The SQL of a function call and its arguments."""
    s = sql.Identifier(SCHEMA)
    p = spec.prompts
    if spec.kind == "generate":
        q = "SELECT token FROM {}.generate(%s, %s, %s, %s, %s) ORDER BY step"
        args = [p[0], spec.tokens, spec.temperature, spec.top_n, spec.seeds[0]]
    elif spec.kind == "complete":
        q = "SELECT {}.complete(%s, %s, %s, %s, %s)"
        args = [p[0], spec.tokens, spec.temperature, spec.top_n, spec.seeds[0]]
    elif spec.kind == "next_tokens":
        q = "SELECT token FROM {}.next_tokens(%s, %s, %s)"
        args = [p[0], spec.top_n, spec.temperature]
    elif spec.kind == "generate[]":
        q = "SELECT i, token FROM {}.generate(%s::text[], %s, %s, %s, %s::bigint[]) ORDER BY i, step"
        args = [list(p), spec.tokens, spec.temperature, spec.top_n, list(spec.seeds)]
    elif spec.kind == "complete[]":
        q = "SELECT unnest({}.complete(%s::text[], %s, %s, %s, %s::bigint[]))"
        args = [list(p), spec.tokens, spec.temperature, spec.top_n, list(spec.seeds)]
    else:
        raise ValueError(spec.kind)
    return sql.SQL(q).format(s), args


def run_function(conn: psycopg.Connection, spec: Spec, timeout_s: float | None = None) -> list:
    """A SQL function call's result rows; with `timeout_s`, under a statement_timeout set for this call only."""
    q, args = query_of(spec)
    with conn.transaction():
        if timeout_s:
            conn.execute("SELECT set_config('statement_timeout', %s, true)", [f"{round(timeout_s * 1000)}ms"])
        return conn.execute(q, args).fetchall()


def shut_socket(conn: psycopg.Connection, done: threading.Event) -> None:
    """The client's end of the connection goes away as when its process dies: the server sees the socket close
    while it computes, not a goodbye message between two rows."""
    with socket.socket(fileno=os.dup(conn.fileno())) as s:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    done.set()


def run_stream(conn: psycopg.Connection, call: Call, got: list, gone: threading.Event) -> None:
    """The runner's streaming path, appending the tokens to `got` as they arrive; for close/kill, the client goes
    away after call.after_rows rows (kill: 0.3 s into the next row, while the server computes it), and sets
    `gone`."""
    spec = call.spec
    params = Params(spec.prompts[0], spec.tokens, spec.temperature, spec.top_n, spec.seeds[0])
    rows = generate_sql(conn, SCHEMA, params, call.timeout_s if call.mode == "timeout" else None)
    timer = None
    try:
        for token in rows:
            got.append(token.token)
            if call.mode in ("close", "kill") and len(got) == call.after_rows:
                if call.mode == "close":
                    conn.close()
                    gone.set()
                    return
                timer = threading.Timer(0.3, shut_socket, [conn, gone])
                timer.start()
    finally:
        if timer is not None:
            timer.cancel()
            timer.join()
        try:
            rows.close()  # its transaction ends with the connection when that is gone: nothing to report
        except (psycopg.Error, GenerationError):
            pass


def result_of(conn: psycopg.Connection, call: Call, got: list, gone: threading.Event | None = None) -> list:
    """Run the call; its comparable result (tokens, or texts for complete)."""
    if call.spec.kind == "stream":
        run_stream(conn, call, got, gone or threading.Event())
        return got
    rows = run_function(conn, call.spec, call.timeout_s if call.mode == "timeout" else None)
    return [tuple(r) if len(r) > 1 else r[0] for r in rows]


# --- the mix -----------------------------------------------------------------------------------------------------

def specs_of(short: list[str], long: list[str]) -> dict[str, list[Spec]]:
    """The distinct calls of each kind of the mix."""
    n = len(short)
    window = [tuple(short[(k + j) % n] for j in range(3)) for k in range(n)]
    return {
        "short": [Spec("generate", "short", (p,), 8, 1.0, 5, (k,)) for k, p in enumerate(short)]
        + [Spec("complete", "short", (p,), 8, 1.0, 1, (0,)) for p in short]
        + [Spec("next_tokens", "short", (p,), 1, 1.0, 5) for p in short]
        + [Spec("generate[]", "short", w, 6, 1.0, 5, (k, k + 1, k + 2)) for k, w in enumerate(window)]
        + [Spec("complete[]", "short", w, 6, 0.8, 5, (k, k, k)) for k, w in enumerate(window)]
        + [Spec("stream", "short", (p,), 10, 1.0, 5, (k,)) for k, p in enumerate(short)],
        "long": [Spec("generate", "long", (long[0],), 4, 1.0, 5, (1,)),
                 Spec("complete", "long", (long[1],), 4, 1.0, 1, (0,)),
                 Spec("next_tokens", "long", (long[0],), 1, 1.0, 5),
                 Spec("stream", "long", (long[1],), 6, 1.0, 5, (2,))],
        # streams long enough to be cancelled or left while their rows come
        "stream40": [Spec("stream", "short", (p,), 40, 1.0, 5, (k,)) for k, p in enumerate(short[:2])],
    }


def schedule(n_calls: int, specs: dict[str, list[Spec]], seed: int) -> list[Call]:
    """The calls in the order they start: mostly short calls, 6% on long prompts, and about 15% cancelled (by a
    statement_timeout, or by the client going away mid-stream)."""
    rng = random.Random(seed)
    some = (lambda share: max(1, round(share * n_calls))) if n_calls >= 12 else (lambda share: 0)
    calls = [Call(rng.choice(specs["long"])) for _ in range(some(0.06))]
    calls += [Call(specs["long"][1], "timeout", 2.0) for _ in range(some(0.03))]  # complete(): cancelled in prefill
    calls += [Call(rng.choice(specs["stream40"]), "timeout", 1.5) for _ in range(some(0.04))]
    calls += [Call(rng.choice(specs["stream40"]), "close", after_rows=3) for _ in range(some(0.04))]
    calls += [Call(rng.choice(specs["stream40"] + specs["long"][3:]), "kill", after_rows=2) for _ in range(some(0.04))]
    calls += [Call(specs["short"][k % len(specs["short"])]) for k in range(n_calls - len(calls))]
    rng.shuffle(calls)
    return calls


def references(conn: psycopg.Connection, calls: list[Call]) -> dict[Spec, list]:
    """Each distinct call once, alone, on a plain connection: what the pool's calls must give. Not those only ever
    called under a statement_timeout that cancels them before any row (a function's, which returns no rows before
    it ends): Soak.expected_of runs one of those alone if it ever completes."""
    out = {}
    for spec in dict.fromkeys(c.spec for c in calls if c.mode != "timeout" or c.spec.kind == "stream"):
        out[spec] = result_of(conn, Call(spec), [])
    return out


# --- memory ------------------------------------------------------------------------------------------------------

def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def server_anon_mb(postmaster: int) -> float:
    """The server's private memory: RssAnon of the postmaster and every process it started, summed."""
    total = private_mb(postmaster) or 0.0
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and parent_of(int(d.name)) == postmaster:
            total += private_mb(int(d.name)) or 0.0
    return total


class ServerMemory:
    """The server's total private memory, polled every half second for its peak while the block runs."""

    def __init__(self, postmaster: int | None) -> None:
        self.postmaster, self.peak = postmaster, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while self.postmaster is not None and not self._stop.wait(0.5):
            self.peak = max(self.peak, server_anon_mb(self.postmaster))

    def __enter__(self) -> "ServerMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --- the soak ----------------------------------------------------------------------------------------------------

@dataclass
class Soak:
    pool: object
    monitor: psycopg.Connection
    expected: dict[Spec, list]
    dsn: str | None
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)  # the monitor connection and the outcomes
    reference_lock: threading.Lock = field(default_factory=threading.Lock)

    def backend_gone(self, pid: int, within_s: float = 15.0) -> bool:
        """Whether the backend of a client that went away has ended (or stopped running its query) in time."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            with self.lock:
                row = self.monitor.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
            if row is None:
                return True
            time.sleep(0.2)
        return False

    def one(self, call: Call) -> Outcome:
        got: list = []
        gone = threading.Event()  # set when the client has gone away (close/kill)
        pid, t = None, time.perf_counter()
        try:
            with self.pool.connection() as conn:
                pid = conn.info.backend_pid
                try:
                    result = result_of(conn, call, got, gone)
                finally:
                    if call.mode in ("close", "kill") and not conn.closed:
                        conn.close()  # the pool replaces it: a shut socket must not go back to the pool
                seconds = time.perf_counter() - t
                if gone.is_set():
                    return self.client_gone(call, got, pid, seconds)
                return self.completed(call, result, pid, seconds)
        except (psycopg.errors.QueryCanceled, GenerationError, psycopg.OperationalError) as e:
            seconds = time.perf_counter() - t
            message = (getattr(e, "diag", None) and e.diag.message_primary) or str(e).strip().splitlines()[0]
            if call.mode == "timeout" and ("statement timeout" in message or "--timeout" in message):
                return self.prefix(call, got, pid, seconds, "statement timeout")
            if gone.is_set():  # whatever the broken connection raised
                return self.client_gone(call, got, pid, seconds)
            return Outcome(call, "unexpected", seconds, f"{type(e).__name__}: {message}", pid)
        except Exception as e:  # anything else is unexpected: reported, not fatal to the soak
            return Outcome(call, "unexpected", time.perf_counter() - t,
                           f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", pid)

    def expected_of(self, spec: Spec) -> list:
        """The call's result alone on a plain connection (run now if the references left it out)."""
        with self.reference_lock:
            if spec not in self.expected:
                with connect(self.dsn) as conn:
                    self.expected[spec] = result_of(conn, Call(spec), [])
            return self.expected[spec]

    def completed(self, call: Call, result: list, pid: int, seconds: float) -> Outcome:
        if result != self.expected_of(call.spec):
            return Outcome(call, "unexpected", seconds, "different tokens than alone", pid)
        return Outcome(call, "ok", seconds, "", pid, private_mb(pid) if call.mode in ("normal", "timeout") else None)

    def prefix(self, call: Call, got: list, pid: int | None, seconds: float, why: str) -> Outcome:
        if got != self.expected_of(call.spec)[:len(got)]:
            return Outcome(call, "unexpected", seconds, f"{why}, after rows that differ from alone", pid)
        return Outcome(call, "cancelled", seconds, why, pid, private_mb(pid) if pid and why != "client gone" else None)

    def client_gone(self, call: Call, got: list, pid: int | None, seconds: float) -> Outcome:
        if pid is not None and not self.backend_gone(pid):
            return Outcome(call, "unexpected", seconds, "the backend kept running after its client went away", pid)
        return self.prefix(call, got, pid, seconds, "client gone")


def run_soak(soak: Soak, calls: list[Call], minutes: float, workers: int) -> float:
    """The calls over `workers` threads, call i starting no sooner than i * minutes * 60 / len(calls) seconds in
    (or as soon as a thread is free, when the server is behind). Returns the wall seconds."""
    todo: queue.Queue = queue.Queue()
    for i, call in enumerate(calls):
        todo.put((i, call))
    gap = minutes * 60 / max(1, len(calls))
    start = time.monotonic()
    done = 0

    def worker() -> None:
        nonlocal done
        while True:
            try:
                i, call = todo.get_nowait()
            except queue.Empty:
                return
            time.sleep(max(0.0, start + i * gap - time.monotonic()))
            outcome = soak.one(call)
            with soak.lock:
                soak.outcomes.append(outcome)
                done += 1
                if outcome.status == "unexpected" or done % 20 == 0:
                    print(f"soak: {done}/{len(calls)} calls, {time.monotonic() - start:.0f} s"
                          + (f"; UNEXPECTED {outcome.call.label}: {outcome.detail}"
                             if outcome.status == "unexpected" else ""), file=sys.stderr, flush=True)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.monotonic() - start


# --- the report --------------------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def calls_table(outcomes: list[Outcome]) -> list[str]:
    rows = defaultdict(list)
    for o in outcomes:
        rows[o.call.label].append(o)
    lines = ["| call | calls | completed | cancelled as asked | unexpected | p50 (s) | p95 (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label in sorted(rows):
        os_ = rows[label]
        n = Counter(o.status for o in os_)
        s = [o.seconds for o in os_]
        lines.append(f"| {label} | {len(os_)} | {n['ok']} | {n['cancelled']} | {n['unexpected']} | "
                     f"{percentile(s, 50):.1f} | {percentile(s, 95):.1f} |")
    return lines


def backends_table(outcomes: list[Outcome], idle: dict[int, float | None]) -> tuple[list[str], float]:
    """Each pooled backend: its calls, its private memory after them (the largest, and the call that left it), and
    idle at the end."""
    after: dict[int, list[float]] = defaultdict(list)
    largest: dict[int, Outcome] = {}
    calls: Counter = Counter()
    for o in outcomes:
        if o.pid is not None:
            calls[o.pid] += 1
            if o.anon_mb is not None:
                after[o.pid].append(o.anon_mb)
                if o.pid not in largest or o.anon_mb > (largest[o.pid].anon_mb or 0.0):
                    largest[o.pid] = o
    lines = ["| backend pid | calls | private MB after its calls: median | largest | after which call | "
             "idle at the end |", "|---:|---:|---:|---:|---|---:|"]
    worst = 0.0
    for pid in sorted(calls):
        a = after.get(pid, [])
        end = idle.get(pid)
        worst = max([worst, *a, end or 0.0])
        lines.append(f"| {pid} | {calls[pid]} | {statistics.median(a) if a else float('nan'):.0f} | "
                     f"{max(a) if a else float('nan'):.0f} | "
                     f"{largest[pid].call.label if pid in largest else ''} | "
                     f"{'gone (closed by the pool or its client)' if end is None else f'{end:.0f}'} |")
    return lines, worst


def server_log_problems(log: Path | None, start: int) -> list[str]:
    """Lines of the embedded server's log since `start` that tell of a crash or of memory running out."""
    if log is None or not log.exists():
        return []
    with log.open("rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    signs = ("terminated by signal", "out of memory", "PANIC:", "server process (PID")
    return [line.strip() for line in text.splitlines() if any(s in line for s in signs)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="spread the calls over this long (default 10)")
    ap.add_argument("--calls", type=int, default=200, help="calls in all (default 200)")
    ap.add_argument("--pool-size", type=int, default=8, help="connections in the pool (default 8)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the mix's order and choices (default 0)")
    ap.add_argument("--max-idle-mb", type=float, default=100.0,
                    help="most private memory a pooled backend may keep after a call (default 100; 0: no check)")
    ap.add_argument("--max-server-mb", type=float, default=4096.0,
                    help="most private memory of the whole server during the soak, shared buffers apart "
                         "(default 4096; 0: no check)")
    ap.add_argument("--keep", action="store_true", help=f"keep the {SCHEMA} model loaded at the end")
    ap.add_argument("--dsn", help="server (default: the embedded one)")
    a = ap.parse_args()
    if a.calls < 1 or a.pool_size < 1 or a.minutes < 0:
        ap.error("--calls and --pool-size must be at least 1, --minutes at least 0")
    try:
        from psycopg_pool import ConnectionPool
    except ImportError:
        sys.exit("soak: needs psycopg-pool (pip install 'gpt-sql[bench]' or pip install psycopg-pool)")

    conn = connect(a.dsn)
    if SCHEMA not in model_names(conn):
        ckpt, label, _ = model(None)
        print(f"soak: loading {SCHEMA} ({label})", file=sys.stderr, flush=True)
        load(conn, ckpt, SCHEMA, progress=sys.stderr.isatty())
        note = fit_shared_buffers(conn)  # may restart the embedded server: before the soak, not in it
        if note:
            print(f"soak: {note}", file=sys.stderr)
        conn = connect(a.dsn)
    embedded = resolve_dsn(a.dsn) is None
    dsn = embedded_uri() if embedded else resolve_dsn(a.dsn)
    log = pgdata_dir() / "log" if embedded else None
    log_start = log.stat().st_size if log and log.exists() else 0
    started = conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
    postmaster = parent_of(conn.info.backend_pid) if private_mb(conn.info.backend_pid) is not None else None
    shared_buffers = conn.execute("SHOW shared_buffers").fetchone()[0]

    tokenizer = Tokenizer(*read_vocabulary(conn, SCHEMA))
    short = prompts_of(tokenizer, 4, 5, 40)
    long = prompts_of(tokenizer, 2, LONG, LONG)
    calls = schedule(a.calls, specs_of(short, long), a.seed)
    t = time.perf_counter()
    print(f"soak: {len({c.spec for c in calls})} distinct calls, each once alone first", file=sys.stderr, flush=True)
    expected = references(conn, calls)
    print(f"soak: references in {time.perf_counter() - t:.0f} s; now {len(calls)} calls over {a.minutes:g} min, "
          f"pool of {a.pool_size}", file=sys.stderr, flush=True)

    pool = ConnectionPool(dsn, min_size=a.pool_size, max_size=a.pool_size, open=True, name="soak",
                          kwargs={"autocommit": True, "application_name": APP})
    try:
        pool.wait(timeout=60)
        soak = Soak(pool, connect(a.dsn), expected, a.dsn)
        with ServerMemory(postmaster) as memory:
            wall = run_soak(soak, calls, a.minutes, a.pool_size)
        time.sleep(3)  # idle: what the backends keep
        pids = [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", [APP])]
        idle = {pid: private_mb(pid) for pid in pids}
        server_idle = server_anon_mb(postmaster) if postmaster else None
    finally:
        pool.close()
    conn = connect(a.dsn)
    restarted = conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0] != started
    problems = server_log_problems(log, log_start)

    outcomes = soak.outcomes
    n = Counter(o.status for o in outcomes)
    unexpected = Counter(o.detail for o in outcomes if o.status == "unexpected")
    cancelled = Counter(o.detail for o in outcomes if o.status == "cancelled")
    completed = [o for o in outcomes if o.status == "ok"]
    backends, worst = backends_table(outcomes, idle)
    peak = memory.peak
    print(f"# gpt-sql soak: {len(outcomes)} calls over {wall / 60:.1f} min, a pool of {a.pool_size} connections\n")
    print(f"- model {SCHEMA}; server {conn.execute('SELECT version()').fetchone()[0].split(',')[0]}; "
          f"shared_buffers {shared_buffers}")
    print(f"- calls done: {len(outcomes)} of {len(calls)}; completed {n['ok']}, cancelled as asked {n['cancelled']} "
          f"({', '.join(f'{k}: {v}' for k, v in sorted(cancelled.items())) or 'none'}), unexpected {n['unexpected']}"
          + (f" ({'; '.join(f'{k}: {v}' for k, v in unexpected.items())})" if unexpected else ""))
    print(f"- tokens equal to the call alone on a plain connection: {len(completed)} of {len(completed)} completed "
          f"calls (a call whose tokens differ counts as unexpected); cancelled streams' rows a prefix of them")
    print(f"- server restarted: {'YES' if restarted else 'no'}; crash or out-of-memory lines in its log: "
          f"{len(problems) if log else 'n/a (not the embedded server)'}" + "".join(f"\n  - {p}" for p in problems))
    if postmaster:
        print(f"- server private memory (RssAnon of all its processes, shared buffers apart): peak {peak:.0f} MB "
              f"during the soak, {server_idle:.0f} MB idle at the end")
        print(f"- pooled backends' private memory after a call or idle: at most {worst:.0f} MB\n")
    else:
        print("- memory: n/a (the server does not run on this machine)\n")
    print("\n".join(calls_table(outcomes)))
    print()
    if postmaster:
        print("\n".join(backends))
    failures = []
    if n["unexpected"] or len(outcomes) != len(calls):
        failures.append(f"{n['unexpected']} unexpected outcomes, {len(calls) - len(outcomes)} calls not done")
    if restarted or problems:
        failures.append("the server restarted or logged a crash")
    if postmaster and a.max_idle_mb and worst > a.max_idle_mb:
        failures.append(f"a pooled backend kept {worst:.0f} MB after a call (> {a.max_idle_mb:g} MB)")
    if postmaster and a.max_server_mb and peak > a.max_server_mb:
        failures.append(f"the server's private memory peaked at {peak:.0f} MB (> {a.max_server_mb:g} MB)")
    if not a.keep:
        drop(conn, SCHEMA)
    for f in failures:
        print(f"soak: FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
