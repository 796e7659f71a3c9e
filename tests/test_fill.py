"""`gpt-sql fill`: every task fills only the NULL targets with the values of the model's SQL functions, row by row;
reruns, jobs, kill -9 and Ctrl-C leave the values of a clean run; bad input is one line before any row changes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from gpt_sql.runner.fill import row_seed
from gpt_sql.runner.replica import start_standby, stop_standby, wait_for_replay
from test_cli import gpt_sql

MODEL = "fill_tiny"
SHAPE = dict(n_embd=32, n_head=2, n_layer=2, n_ctx=64, seed=33)
TEXTS = ["Happy New Year!", "I wish you a happy New Year", "The quick brown fox jumps over the lazy dog",
         "SELECT token FROM tokens WHERE id = 42;", "It's 2026 and we're here.", "many happy returns of the day",
         "naïve café, Москва", "the dog doesn't mind", "Happy", "SQL is a language too."]
LONG = "Happy New Year! " * 40  # far more than n_ctx = 64 tokens
CHOICES = ["happy", "dog", "SQL"]
COLUMNS = "ppl float8, emb vector(32), half halfvec(32), done text, label text, probs jsonb"


@pytest.fixture(scope="module")
def model(load_tiny):
    return load_tiny(MODEL, **SHAPE)


def make_table(conn, name: str, texts: list[str | None], columns: str = COLUMNS) -> None:
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(name)))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text, {})").format(
        sql.Identifier(name), sql.SQL(columns)))
    with conn.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} (id, body) VALUES (%s, %s)").format(sql.Identifier(name)),
                        list(enumerate(texts, 1)))


def fill(*args: str, timeout: float = 300):
    return gpt_sql("fill", *args, "--model", MODEL, timeout=timeout)


def column(conn, table: str, col: str) -> dict[int, object]:
    return dict(conn.execute(sql.SQL("SELECT id, {}::text FROM {} ORDER BY id").format(
        sql.Identifier(col), sql.Identifier(table))).fetchall())


EXPECTED = {  # each row's value from the model's own SQL function
    "ppl": "fill_tiny.perplexity(body)",
    "emb": "fill_tiny.embed(body)",
    "half": "fill_tiny.embed(body)::halfvec",
    "label": "(SELECT c.choice FROM fill_tiny.classify(body, %(choices)s) c ORDER BY c.prob DESC LIMIT 1)",
    "probs": "(SELECT jsonb_object_agg(c.choice, c.prob) FROM fill_tiny.classify(body, %(choices)s) c)",
    "done": "fill_tiny.complete(body, 5, seed => ('x' || left(md5('7:' || id::text), 16))::bit(64)::bigint)",
}


def expected(conn, table: str, col: str, ids: list[int]) -> dict[int, str]:
    query = sql.SQL("SELECT id, (" + EXPECTED[col] + ")::text FROM {} WHERE id = ANY(%(ids)s) ORDER BY id").format(
        sql.Identifier(table))
    return dict(conn.execute(query, {"choices": CHOICES, "ids": ids}).fetchall())


ARGS = {"ppl": ["perplexity"], "emb": ["embed"], "half": ["embed"], "label": ["classify", "--choices", *CHOICES],
        "probs": ["classify", "--choices", *CHOICES], "done": ["complete", "--tokens", "5", "--seed", "7"]}


@pytest.mark.parametrize("col", list(ARGS))
def test_each_task_fills_the_nulls_with_the_functions_values(conn, model, col):
    table = f"fill_{col}"
    make_table(conn, table, [*TEXTS, None, "", LONG])
    n = len(TEXTS)
    conn.execute(sql.SQL("UPDATE {} SET {} = (SELECT {} FROM {} WHERE id = 2) WHERE id = 1").format(
        sql.Identifier(table), sql.Identifier(col), sql.SQL(EXPECTED[col].replace("%(choices)s", "%s")),
        sql.Identifier(table)), [CHOICES] if "%(choices)s" in EXPECTED[col] else None)
    before = column(conn, table, col)[1]  # a value already there: row 2's, which row 1 would not get
    r = fill(*ARGS[col], "--table", table, "--text", "body", "--into", col, "--batch", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"filled {n - 1} rows, skipped 3 (2 NULL or empty text, 1 longer than n_ctx), ")
    got = column(conn, table, col)
    assert got[1] == before
    assert {i: got[i] for i in range(2, n + 1)} == expected(conn, table, col, list(range(2, n + 1)))
    assert got[n + 1] is None and got[n + 2] is None and got[n + 3] is None
    if col == "done":
        assert len(set(got.values())) > 5  # the rows' seeds differ
    again = fill(*ARGS[col], "--table", table, "--text", "body", "--into", col, "--json")
    assert again.returncode == 0, again.stderr
    out = json.loads(again.stdout)
    assert out["filled"] == 0 and out["skipped_keys"] == {"empty": [str(n + 1), str(n + 2)],
                                                          "too_long": [str(n + 3)], "filled": []}
    assert column(conn, table, col) == got


def test_row_seed_is_the_sql_expression(conn):
    for seed, key in ((0, "1"), (7, "42"), (-3, "naïve"), (2**62, "a:b")):
        assert conn.execute("SELECT ('x' || left(md5(%s || ':' || %s), 16))::bit(64)::bigint",
                            [str(seed), key]).fetchone()[0] == row_seed(seed, key)


def test_embed_layer_and_rerun_after_clearing_some(conn, model):
    make_table(conn, "fill_layer", TEXTS)
    r = fill("embed", "--layer", "0", "--table", "fill_layer", "--text", "body", "--into", "emb", "--batch", "4")
    assert r.returncode == 0, r.stderr
    got = column(conn, "fill_layer", "emb")
    assert got == dict(conn.execute("SELECT id, fill_tiny.embed(body, 0)::text FROM fill_layer").fetchall())
    assert got != dict(conn.execute("SELECT id, fill_tiny.embed(body)::text FROM fill_layer").fetchall())
    conn.execute("UPDATE fill_layer SET emb = NULL WHERE id % 3 = 0")
    r = fill("embed", "--layer", "0", "--table", "fill_layer", "--text", "body", "--into", "emb", "--batch", "4")
    assert r.returncode == 0 and r.stdout.startswith("filled 3 rows, skipped 0, "), r.stdout + r.stderr
    assert column(conn, "fill_layer", "emb") == got


@pytest.mark.parametrize("task,col", [("perplexity", "ppl"), ("complete", "done")])
def test_two_jobs_give_the_values_of_one(conn, model, task, col):
    for jobs in ("1", "2"):
        make_table(conn, f"fill_jobs{jobs}", TEXTS * 2)
        r = fill(*ARGS[col], "--table", f"fill_jobs{jobs}", "--text", "body", "--into", col, "--jobs", jobs,
                 "--batch", "3")
        assert r.returncode == 0 and r.stdout.startswith(f"filled {2 * len(TEXTS)} rows"), r.stderr
    one, two = column(conn, "fill_jobs1", col), column(conn, "fill_jobs2", col)
    assert one == two and None not in one.values()


def test_schema_qualified_table_and_a_text_key(conn, model):
    conn.execute("DROP SCHEMA IF EXISTS fill_other CASCADE")
    conn.execute('CREATE SCHEMA fill_other')
    conn.execute('CREATE TABLE fill_other."Docs" (n serial PRIMARY KEY, name text UNIQUE, body text, score real)')
    with conn.cursor() as cur:
        cur.executemany('INSERT INTO fill_other."Docs" (name, body) VALUES (%s, %s)',
                        [(f"doc {i}", t) for i, t in enumerate(TEXTS)])
    r = fill("perplexity", "--table", 'fill_other."Docs"', "--key", "name", "--text", "body", "--into", "score",
             "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["filled"] == len(TEXTS)
    rows = conn.execute('SELECT score, fill_tiny.perplexity(body)::real FROM fill_other."Docs"').fetchall()
    assert all(a == b for a, b in rows)


# --- interruptions --------------------------------------------------------------------------------------------

def popen_fill(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gpt_sql.runner.cli", "fill", *args, "--model", MODEL],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_filled(conn, table: str, col: str, at_least: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = conn.execute(sql.SQL("SELECT count({}) FROM {}").format(sql.Identifier(col), sql.Identifier(table))
                         ).fetchone()[0]
        if n >= at_least:
            return n
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{table}.{col}: fewer than {at_least} rows filled in {timeout} s")


SLOW = ["complete", "--tokens", "12", "--seed", "7", "--batch", "2"]  # a few batches a second on the tiny model


def test_kill_9_mid_run_then_a_rerun_gives_the_clean_values(conn, model):
    texts = TEXTS * 3
    make_table(conn, "fill_clean", texts)
    r = fill(*SLOW, "--table", "fill_clean", "--text", "body", "--into", "done")
    assert r.returncode == 0, r.stderr
    clean = column(conn, "fill_clean", "done")
    make_table(conn, "fill_killed", texts)
    proc = popen_fill(*SLOW, "--table", "fill_killed", "--text", "body", "--into", "done")
    wait_filled(conn, "fill_killed", "done", 4, proc)
    proc.kill()
    proc.wait()
    time.sleep(0.5)  # the server sees the client gone and rolls back the batch in flight
    partial = column(conn, "fill_killed", "done")
    assert None in partial.values(), "the run ended before the kill: nothing tested"
    assert all(v == clean[i] for i, v in partial.items() if v is not None)  # no row half written
    r = fill(*SLOW, "--table", "fill_killed", "--text", "body", "--into", "done")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"filled {sum(v is None for v in partial.values())} rows")
    assert column(conn, "fill_killed", "done") == clean


def test_ctrl_c_stops_after_the_batch_in_flight(conn, model):
    make_table(conn, "fill_sigint", TEXTS * 3)
    proc = popen_fill(*SLOW, "--table", "fill_sigint", "--text", "body", "--into", "done")
    wait_filled(conn, "fill_sigint", "done", 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    n = conn.execute("SELECT count(done) FROM fill_sigint").fetchone()[0]
    assert 0 < n < 3 * len(TEXTS)
    assert f"gpt-sql: interrupted: filled {n} of {3 * len(TEXTS)} rows" in err
    assert out.startswith(f"filled {n} rows")
    assert "Traceback" not in err


# --- bad input: one line, non-zero, nothing changed -------------------------------------------------------------

def snapshot(conn) -> list:
    return conn.execute("SELECT * FROM fill_bad ORDER BY id").fetchall()


@pytest.fixture(scope="module")
def bad_table(conn, model):
    make_table(conn, "fill_bad", TEXTS, COLUMNS + ", big vector(768), other text")
    conn.execute("CREATE TABLE IF NOT EXISTS fill_nokey (body text, ppl float8)")
    conn.execute("CREATE TABLE IF NOT EXISTS fill_twokeys (a int, b int, body text, ppl float8, PRIMARY KEY (a, b))")
    conn.execute("INSERT INTO fill_nokey VALUES ('Happy New Year!', NULL)")


@pytest.mark.parametrize("args,message", [
    (["perplexity", "--table", "fill_nosuch", "--text", "body", "--into", "ppl"], "no table fill_nosuch"),
    (["perplexity", "--table", "nosuch.fill_bad", "--text", "body", "--into", "ppl"], "no table nosuch.fill_bad"),
    (["perplexity", "--table", "fill_bad", "--text", "nosuch", "--into", "ppl"], "--text: no column nosuch"),
    (["perplexity", "--table", "fill_bad", "--text", "body", "--into", "nosuch"], "--into: no column nosuch"),
    (["perplexity", "--table", "fill_bad", "--text", "body", "--into", "ppl", "--key", "nosuch"],
     "--key: no column nosuch"),
    (["perplexity", "--table", "fill_bad", "--text", "body", "--into", "ppl", "--key", "other"], "not unique"),
    (["perplexity", "--table", "fill_nokey", "--text", "body", "--into", "ppl"], "has no primary key: give --key"),
    (["perplexity", "--table", "fill_twokeys", "--text", "body", "--into", "ppl"], "primary key of public.fill_twokeys "
                                                                                   "has 2 columns"),
    (["perplexity", "--table", "fill_bad", "--text", "body", "--into", "done"], "goes into a float column"),
    (["embed", "--table", "fill_bad", "--text", "body", "--into", "big"], "is vector(768) but fill_tiny embeds in 32"),
    (["embed", "--table", "fill_bad", "--text", "body", "--into", "ppl"], "goes into a vector or halfvec column"),
    (["complete", "--table", "fill_bad", "--text", "body", "--into", "emb"], "goes into a text column"),
    (["classify", "--table", "fill_bad", "--text", "body", "--into", "ppl", "--choices", "a"],
     "goes into a text or jsonb column"),
    (["perplexity", "--table", "fill_bad", "--text", "ppl", "--into", "ppl"], "same column"),
    (["perplexity", "--table", "fill_bad", "--text", "emb", "--into", "ppl"], "--text emb is vector(32), not text"),
    (["classify", "--table", "fill_bad", "--text", "body", "--into", "label"], "classify needs --choices"),
    (["embed", "--table", "fill_bad", "--text", "body", "--into", "emb", "--layer", "5"], "--layer must be between"),
    (["perplexity", "--table", "fill_bad", "--text", "body", "--into", "ppl", "--jobs", "0"], "must be at least 1"),
    (["complete", "--table", "fill_bad", "--text", "body", "--into", "done", "--tokens", "64"], "leaves no room"),
])
def test_bad_input_is_one_line_and_changes_nothing(conn, bad_table, args, message):
    before = snapshot(conn)
    r = fill(*args)
    assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stdout == ""
    assert snapshot(conn) == before


def test_a_role_that_may_read_but_not_update(conn, dsn, bad_table):
    conn.execute("DROP ROLE IF EXISTS fill_reader")
    conn.execute("CREATE ROLE fill_reader LOGIN")
    r = gpt_sql("grant", "fill_reader", "--model", MODEL)
    assert r.returncode == 0, r.stderr
    conn.execute("GRANT SELECT ON fill_bad TO fill_reader")
    host = psycopg.conninfo.conninfo_to_dict(dsn)["host"]
    reader = f"postgresql://fill_reader@/postgres?host={host}"
    before = snapshot(conn)
    r = fill("perplexity", "--table", "fill_bad", "--text", "body", "--into", "ppl", "--dsn", reader)
    assert r.returncode == 1 and r.stderr.strip() == "gpt-sql: error: this role may not update public.fill_bad.ppl"
    conn.execute("GRANT UPDATE (ppl) ON fill_bad TO fill_reader")
    r = fill("perplexity", "--table", "fill_bad", "--text", "body", "--into", "done", "--dsn", reader)
    assert r.returncode == 1 and "goes into a float column" in r.stderr  # the type is checked before the grants
    assert snapshot(conn) == before
    conn.execute("REVOKE ALL ON fill_bad FROM fill_reader")


# --- across servers -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def standby(dsn, conn, model):
    primary_socket = Path(psycopg.conninfo.conninfo_to_dict(dsn)["host"])
    directory = Path(os.environ["GPT_SQL_DATA"]).parent / "fill_standby"
    uri = start_standby(primary_socket, directory)
    with psycopg.connect(uri, autocommit=True) as s:
        wait_for_replay(conn, s)
    yield uri
    stop_standby(directory)


def model_reads(uri: str) -> int:
    """Scans of the model's weight tables on one server, as its statistics count them (each backend's are
    flushed when it exits)."""
    with psycopg.connect(uri, autocommit=True) as c:
        return c.execute("SELECT coalesce(sum(coalesce(seq_scan, 0) + coalesce(idx_scan, 0)), 0)"
                         " FROM pg_stat_user_tables WHERE schemaname = %s AND relname IN ('wpe', 'wte')",
                         [MODEL]).fetchone()[0]


def test_compute_on_a_standby_write_through_the_primary(conn, dsn, standby):
    make_table(conn, "fill_replica", TEXTS)
    with psycopg.connect(standby, autocommit=True) as s:
        wait_for_replay(conn, s)
    hosts = [psycopg.conninfo.conninfo_to_dict(u)["host"] for u in (standby, dsn)]
    # a multi-host DSN that libpq resolves to a standby: the primary is listed, and passed over
    standbys = f"postgresql://postgres@/postgres?host={','.join(hosts)}&target_session_attrs=standby"
    conn.execute("SELECT pg_stat_force_next_flush()")  # this session's own reads of the model, counted before
    conn.execute("SELECT 1")
    time.sleep(1)  # and those of the backends of earlier tests, counted as they exit
    on_primary, on_standby = model_reads(dsn), model_reads(standby)
    r = fill("perplexity", "--table", "fill_replica", "--text", "body", "--into", "ppl", "--dsn", dsn,
             "--compute-dsn", standbys, "--jobs", "2", "--batch", "3")
    assert r.returncode == 0 and r.stdout.startswith(f"filled {len(TEXTS)} rows"), r.stderr
    time.sleep(1)  # the run's backends count their reads as they exit
    assert model_reads(standby) > on_standby and model_reads(dsn) == on_primary
    assert column(conn, "fill_replica", "ppl") == expected(conn, "fill_replica", "ppl", list(range(1, 11)))
    r = fill("perplexity", "--table", "fill_replica", "--text", "body", "--into", "ppl", "--dsn", standby)
    assert r.returncode == 1 and "--dsn names a standby" in r.stderr


# --- output ---------------------------------------------------------------------------------------------------

def test_help_states_the_seed_derivation():
    r = gpt_sql("fill", "--help")
    assert r.returncode == 0 and "usage: gpt-sql fill" in r.stdout
    assert "md5('SEED:KEY')" in " ".join(r.stdout.split())


def run_on_a_terminal(args: list[str]) -> tuple[int, str, str]:
    """The command with stderr on a pseudo-terminal of 100 columns (stdout a pipe): its exit code, stdout, and
    what the terminal showed."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "gpt_sql.runner.cli", *args], stdout=subprocess.PIPE,
                            stderr=slave)
    os.close(slave)
    shown = b""
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the terminal's other end closed
            break
        if not data:
            break
        shown += data
    os.close(master)
    out = proc.stdout.read().decode()
    return proc.wait(), out, shown.decode(errors="replace")


def test_a_progress_bar_on_a_terminal_nothing_on_a_pipe(conn, model):
    make_table(conn, "fill_bar", TEXTS * 2)
    args = ["fill", *SLOW, "--table", "fill_bar", "--text", "body", "--into", "done", "--model", MODEL]
    code, out, shown = run_on_a_terminal(args)
    assert code == 0 and out.startswith(f"filled {2 * len(TEXTS)} rows"), shown
    assert f"{2 * len(TEXTS)}/{2 * len(TEXTS)} [" in shown and "row/s]" in shown
    conn.execute("UPDATE fill_bar SET done = NULL")
    r = fill(*SLOW, "--table", "fill_bar", "--text", "body", "--into", "done")
    assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith(f"filled {2 * len(TEXTS)} rows")


def test_complete_takes_runs_sampling_options(conn, model):
    make_table(conn, "fill_sampling", TEXTS)
    r = fill("complete", "--table", "fill_sampling", "--text", "body", "--into", "done", "--tokens", "8", "--seed",
             "-5", "--temperature", "0.7", "--top-n", "9", "--top-p", "0.9", "--stop", " ", "--stop", "e")
    assert r.returncode == 0, r.stderr
    # complete() is NULL where a stop string comes first; fill writes the empty completion, so the row is done
    want = dict(conn.execute(
        "SELECT id, coalesce(fill_tiny.complete(body, 8, 0.7, 9, ('x' || left(md5('-5:' || id::text), 16))::bit(64)"
        "::bigint, ARRAY[' ', 'e'], 0.9), '') FROM fill_sampling").fetchall())
    got = column(conn, "fill_sampling", "done")
    assert got == want and not any(" " in v or "e" in v for v in got.values())
    assert "" in got.values() and len(set(got.values())) > 3
