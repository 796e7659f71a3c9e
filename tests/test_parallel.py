"""Model functions over a table in parallel workers: declared so that PostgreSQL may run them there, the work spread
over the workers, the values the bits of single calls, and a timeout or a cancel stopping every worker.

Each test makes its own table (rows on pages of their own, `parallel_workers = 2`) on its own connection, and drops
it. A parallel scan hands out pages, not rows: a table whose rows share one page gives them all to one process.
"""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import psycopg
import pytest
from psycopg import sql

from gpt_sql.loader.functions import CALL_COST, FUNCTIONS

MODEL = "par_tiny"
SHAPE = dict(n_embd=32, n_head=2, n_layer=2, n_ctx=64, seed=7)
WORDS = "Happy New Year! The quick brown fox jumps over the lazy dog; SQL is a language too. naïve café".split()


@pytest.fixture(scope="module")
def model(load_tiny) -> str:
    load_tiny(MODEL, **SHAPE)
    return MODEL


def texts(n: int) -> list[str]:
    """n different texts of 3 to 9 words."""
    return [" ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(3 + i % 7)) for i in range(n)]


@pytest.fixture
def session(dsn) -> Iterator[psycopg.Connection]:
    """A connection that may run 2 parallel workers for a statement, whatever the server's cores."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SET max_parallel_workers_per_gather = 2")
        c.execute("SET max_parallel_workers = 2")
        yield c


@contextmanager
def table(conn: psycopg.Connection, rows: list[str]) -> Iterator[str]:
    """A table of `rows` (id from 1, body), one row a page: a pad over half of what fillfactor 10 leaves a page."""
    name = f"par_{uuid.uuid4().hex[:10]}"
    t = sql.Identifier(name)
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text NOT NULL, pad text NOT NULL)"
                         " WITH (fillfactor = 10, parallel_workers = 2)").format(t))
    try:
        with conn.cursor().copy(sql.SQL("COPY {} (id, body, pad) FROM STDIN").format(t)) as copy:
            for i, body in enumerate(rows, 1):
                copy.write_row((i, body, "." * 600))
        conn.execute(sql.SQL("ANALYZE {}").format(t))
        pages, most = conn.execute(sql.SQL("SELECT count(*), max(n) FROM (SELECT (ctid::text::point)[0], count(*) AS n"
                                           " FROM {} GROUP BY 1) page").format(t)).fetchone()
        assert (pages, most) == (len(rows), 1), f"{len(rows)} rows on {pages} pages, at most {most} on one"
        yield name
    finally:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(t))


def nodes(plan: dict) -> Iterator[dict]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def explain_analyze(conn: psycopg.Connection, statement: sql.Composable) -> list[dict]:
    """The plan's nodes as EXPLAIN (ANALYZE, VERBOSE) reports them, having run `statement`."""
    out = conn.execute(sql.SQL("EXPLAIN (ANALYZE, VERBOSE, FORMAT JSON) ") + statement).fetchone()[0]
    return list(nodes(out[0]["Plan"]))


def wait_for(check: Callable[[], object], seconds: float) -> object:
    deadline = time.monotonic() + seconds
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def workers_of(conn: psycopg.Connection, leader: int) -> list[tuple]:
    """The parallel workers of backend `leader` that pg_stat_activity shows now."""
    return conn.execute("SELECT pid, state FROM pg_stat_activity WHERE backend_type = 'parallel worker'"
                        " AND leader_pid = %s", (leader,)).fetchall()


def assert_nothing_running(conn: psycopg.Connection, leader: int) -> None:
    """Within a bound: no parallel worker of `leader` left, and `leader` itself idle (`conn` another connection)."""
    assert wait_for(lambda: not workers_of(conn, leader), 10), workers_of(conn, leader)
    state = lambda: conn.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (leader,)).fetchone()  # noqa
    assert wait_for(lambda: state() in (None, ("idle",)), 10), state()


def test_declared_stable_parallel_safe_and_costly(conn, model):
    """Each model function, as loaded: STABLE PARALLEL SAFE with a COST above a call's fixed work; every function it
    may call in a worker (the schema's helpers, the vector_cat aggregate) PARALLEL SAFE; raise_error VOLATILE, so the
    planner never calls it ahead of time."""
    rows = conn.execute("SELECT p.proname, p.provolatile, p.proparallel, p.procost, p.prokind, p.proconfig"
                        " FROM pg_proc p WHERE p.pronamespace = %s::regnamespace", (model,)).fetchall()
    by_name = {name: (vol, par, cost, config) for name, vol, par, cost, _, config in rows}
    for f in FUNCTIONS:
        vol, par, cost, config = by_name[f.name]
        assert (vol, par) == ("s", "s"), f"{f.name}: provolatile {vol}, proparallel {par}"
        assert cost > CALL_COST, f"{f.name}: COST {cost}"
        # the call's own query stays serial: a worker per call is what spreads the rows
        assert "max_parallel_workers_per_gather=0" in config, f"{f.name}: {config}"
    unsafe = [(name, kind) for name, _, par, _, kind, _ in rows if par != "s"]
    assert not unsafe, f"not PARALLEL SAFE: {unsafe}"
    assert ("vector_cat", "a") in [(name, kind) for name, _, _, _, kind, _ in rows]
    assert by_name["raise_error"][0] == "v"


@pytest.mark.parametrize("function", ["perplexity", "embed", "complete"])
def test_select_spreads_over_the_workers(session, conn, model, function):
    """`SELECT id, f(body) FROM t` on a table of 12 pages: a Gather over a Parallel Seq Scan, both workers launched,
    and each worker computed rows."""
    with table(session, texts(12)) as t:
        statement = sql.SQL("SELECT id, {}.{}(body) FROM {}").format(sql.Identifier(model), sql.Identifier(function),
                                                                      sql.Identifier(t))
        plan = explain_analyze(session, statement)
        gather = [n for n in plan if n["Node Type"] == "Gather"]
        assert gather, [n["Node Type"] for n in plan]
        assert gather[0]["Workers Launched"] == 2
        scan = next(n for n in plan if n["Node Type"] == "Seq Scan")
        assert scan["Parallel Aware"]
        per_worker = [w["Actual Rows"] for w in scan["Workers"]]
        assert len(per_worker) == 2 and all(rows >= 1 for rows in per_worker), per_worker
        assert_nothing_running(conn, session.info.backend_pid)


def test_values_are_the_bits_of_single_calls(session, model):
    """Every row computed under a Gather (in a worker or the leader; each worker computed some) equals the single
    call's bits: perplexity (float8), embed (the vector's text, which round-trips each float4), a seeded completion."""
    m = sql.Identifier(model)
    bodies = texts(10)
    with table(session, bodies) as t:
        out = f"{t}_out"
        try:
            plan = explain_analyze(session, sql.SQL(
                "CREATE TABLE {} AS SELECT id, {}.perplexity(body) AS p, {}.embed(body)::text AS e,"
                " {}.complete(body, 4, 1.0, 5, 3) AS c FROM {}").format(sql.Identifier(out), m, m, m,
                                                                       sql.Identifier(t)))
            assert any(n["Node Type"] == "Gather" and n["Workers Launched"] == 2 for n in plan)
            scan = next(n for n in plan if n["Node Type"] == "Seq Scan")
            assert all(w["Actual Rows"] >= 1 for w in scan["Workers"]), scan["Workers"]
            got = {i: (p, e, c) for i, p, e, c in session.execute(
                sql.SQL("SELECT id, p, e, c FROM {}").format(sql.Identifier(out))).fetchall()}
        finally:
            session.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(out)))
    assert sorted(got) == list(range(1, len(bodies) + 1))
    single = sql.SQL("SELECT {}.perplexity(%s), {}.embed(%s)::text, {}.complete(%s, 4, 1.0, 5, 3)").format(m, m, m)
    for i, body in enumerate(bodies, 1):
        assert got[i] == session.execute(single, (body, body, body)).fetchone(), body


def run_long_select(session: psycopg.Connection, model: str, t: str) -> tuple[threading.Thread, dict]:
    """The SELECT over `t` in a thread of its own; what it raised lands in the dict."""
    outcome: dict = {}

    def run() -> None:
        try:
            session.execute(sql.SQL("SELECT id, {}.complete(body, 30) FROM {}").format(
                sql.Identifier(model), sql.Identifier(t))).fetchall()
        except psycopg.Error as e:
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("how", ["statement_timeout", "cancel"])
def test_timeout_and_cancel_stop_every_worker(session, conn, model, how):
    """While the workers compute, a statement timeout or a cancel request ends the statement with its error, and
    then neither the workers nor the leader run on."""
    with table(session, texts(120)) as t:
        leader = session.info.backend_pid
        if how == "statement_timeout":
            session.execute("SET statement_timeout = '3s'")
        thread, outcome = run_long_select(session, model, t)
        try:
            assert wait_for(lambda: len(workers_of(conn, leader)) == 2, 20), "no parallel workers started"
            if how == "cancel":
                time.sleep(0.5)
                session.cancel_safe()
            thread.join(30)
            assert not thread.is_alive(), "the statement did not stop"
        finally:
            if thread.is_alive():
                conn.execute("SELECT pg_cancel_backend(%s)", (leader,))
                thread.join(30)
        assert isinstance(outcome.get("error"), psycopg.errors.QueryCanceled), outcome
        why = "statement timeout" if how == "statement_timeout" else "user request"
        assert why in str(outcome["error"])
        assert_nothing_running(conn, leader)
        session.execute("RESET statement_timeout")


BULK_DOC = Path(__file__).resolve().parents[1] / "docs" / "bulk.md"


def readme_statements() -> list[str]:
    """The statements of the ```sql blocks of docs/bulk.md's section on parallel workers, in order."""
    text = BULK_DOC.read_text(encoding="utf-8")
    section = text[text.index("## Parallel workers"):]
    section = section[:section.index("\n## ")]
    statements = []
    for block in section.split("```sql")[1:]:
        code = "\n".join(line.split("--")[0] for line in block[:block.index("```")].splitlines())
        statements += [s.strip() for s in code.split(";") if s.strip()]
    return statements


def test_readme_parallel_forms(session, conn, model):
    """docs/bulk.md's statements run as written, and each one it says spreads gets a Gather with its workers, the
    UPDATE none; the form it warns of (ORDER BY the key) leaves every row to one process."""
    statements = [s.replace("gpt2_124m.", f"{model}.") for s in readme_statements()]
    calls = [s for s in statements if f"{model}." in s]  # every one a SELECT or CREATE ... AS, said to spread
    assert len(statements) == 9 and len(calls) == 7, statements
    n_embd = SHAPE["n_embd"]
    schema = f"par_readme_{uuid.uuid4().hex[:8]}"
    session.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        session.execute(sql.SQL("SET search_path = {}, public").format(sql.Identifier(schema)))
        bodies = texts(8)
        for name, columns in (("comments", "body text"), ("reviews", "body text"),
                              ("articles", f"title text, embedding vector({n_embd})")):
            session.execute(sql.SQL(f"CREATE TABLE {{}} (id int PRIMARY KEY, {columns}, pad text)"
                                    " WITH (fillfactor = 10, parallel_workers = 2)").format(sql.Identifier(name)))
            session.execute(sql.SQL("INSERT INTO {} (id, {}, pad) SELECT i, b, rpad('', 600) FROM"
                                    " unnest(%s::text[]) WITH ORDINALITY AS u(b, i)").format(
                sql.Identifier(name), sql.Identifier(columns.split()[0])), (bodies,))
            session.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(name)))
        for statement in statements:
            plan = explain_analyze(session, sql.SQL(statement))
            gathers = [n for n in plan if n["Node Type"] in ("Gather", "Gather Merge")]
            if statement in calls:
                assert gathers and gathers[0]["Workers Launched"] == 2, (statement, [n["Node Type"] for n in plan])
            elif statement.startswith("UPDATE"):
                assert not gathers, statement
        assert session.execute("SELECT count(*) FROM articles WHERE embedding IS NOT NULL").fetchone()[0] == 8
        # the trap, where the planner takes it (forced here: which it takes depends on the costs): each process's
        # rows of the Parallel Index Scan, the leader's being the rest
        session.execute("SET enable_seqscan = off")
        plan = explain_analyze(session, sql.SQL(f"SELECT id, {model}.perplexity(body) FROM comments ORDER BY id"))
        session.execute("RESET enable_seqscan")
        scan = next(n for n in plan if n.get("Parallel Aware"))
        assert scan["Node Type"] == "Index Scan", scan["Node Type"]
        per_worker = [w["Actual Rows"] for w in scan["Workers"]]
        processes = per_worker + [round(scan["Actual Rows"] * scan["Actual Loops"] - sum(per_worker))]
        assert sorted(processes)[-1] == 8 and sum(processes) == 8, processes
    finally:
        session.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        session.execute("DROP TABLE IF EXISTS pg_temp.e")
    assert_nothing_running(conn, session.info.backend_pid)


def test_an_error_in_a_worker_reaches_the_client(session, conn, model):
    """A text too long for the model, in a row a worker computes (the leader computes none here): the statement
    fails with raise_error's one-line message (PARALLEL SAFE: a worker's error reaches the leader as it is), and
    nothing runs on."""
    rows = texts(12)
    rows[-1] = " ".join(WORDS * 6)  # far beyond n_ctx = 64 tokens
    session.execute("SET parallel_leader_participation = off")
    with table(session, rows) as t:
        statement = sql.SQL("SELECT id, {}.perplexity(body) FROM {}").format(sql.Identifier(model), sql.Identifier(t))
        assert "Gather" in "\n".join(r[0] for r in session.execute(sql.SQL("EXPLAIN ") + statement))
        with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
            session.execute(statement).fetchall()
        assert "n_ctx = 64" in e.value.diag.message_primary, e.value.diag.message_primary
        assert "parallel worker" in (e.value.diag.context or ""), e.value.diag.context
        assert_nothing_running(conn, session.info.backend_pid)
