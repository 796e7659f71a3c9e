"""`gpt-sql fill`: a model function over a table's rows, each result written into a column of the row.

Only rows whose target column IS NULL are filled, in batches: a batch is computed (several texts through one query
where the query takes several prompts) and written in one transaction, by one UPDATE that re-checks `target IS
NULL`, so a run killed at any moment loses at most its unfinished batches, a second run finishes the rest, and no
value is ever half written or overwritten. With --compute-dsn the computing queries run on other servers (standbys:
a generation only reads) and the results are written through the primary.

Table and column names reach SQL only as identifiers (psycopg.sql.Identifier), texts and results only as bound
values; results travel as one JSON array that jsonb_populate_recordset turns into rows of the table's own type, so
every target type (text, float, vector, halfvec, jsonb) gets the value through its own input function.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import psycopg
from psycopg import sql

from .engine import Batch, GenerationError, _rows as query_rows
from .models import ModelError, read_vocabulary, resolve_model
from .tokenizer import Tokenizer

TASKS = ("complete", "embed", "perplexity", "classify")
# why a row was left NULL, in the order the summary names them
SKIPS = {"empty": "NULL or empty text", "too_long": "longer than n_ctx", "filled": "filled meanwhile by another run"}


class FillError(Exception):
    """Bad input found before any row changed (no such table, column or key, a target of the wrong type, ...)."""


@dataclass(frozen=True)
class Sampling:
    """complete's options, as `gpt-sql run` takes them; each row's seed is row_seed(seed, its key)."""
    tokens: int = 10
    temperature: float = 1.0
    top_n: int = 5
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0


@dataclass(frozen=True)
class Task:
    name: str  # one of TASKS
    sampling: Sampling = Sampling()
    layer: int | None = None  # embed
    choices: tuple[str, ...] = ()  # classify


@dataclass(frozen=True)
class Target:
    """The checked table: its qualified name, its key, text and target columns (catalog spellings)."""
    table: sql.Composable
    name: str  # schema.table, for messages
    key: str
    text: str
    into: str
    into_kind: str  # text, float, vector or jsonb
    n_ctx: int


@dataclass(frozen=True)
class Row:
    key: object  # as psycopg loads it: for the keyset (key > last)
    key_text: str  # as the server writes it: to name the row in the results and the JSON output
    text: str | None


@dataclass
class Summary:
    total: int  # rows whose target was NULL when the run started
    filled: int = 0
    visited: int = 0  # filled or skipped
    skipped: dict[str, list[str]] = field(default_factory=lambda: {reason: [] for reason in SKIPS})
    seconds: float = 0.0
    interrupted: bool = False

    def line(self) -> str:
        skipped = sum(map(len, self.skipped.values()))
        why = ", ".join(f"{len(keys)} {SKIPS[r]}" for r, keys in self.skipped.items() if keys)
        return f"filled {self.filled} rows, skipped {skipped}{f' ({why})' if why else ''}, {self.seconds:.1f} s"

    def json(self) -> str:
        return json.dumps({"filled": self.filled, "skipped": {r: len(k) for r, k in self.skipped.items()},
                           "skipped_keys": self.skipped, "seconds": round(self.seconds, 3),
                           "interrupted": self.interrupted}, ensure_ascii=False)


def row_seed(seed: int, key_text: str) -> int:
    """A row's seed for complete: the first 8 bytes of md5('<seed>:<key as text>') as a signed 64-bit integer. In
    SQL: ('x' || left(md5(seed || ':' || key::text), 16))::bit(64)::bigint."""
    return int.from_bytes(hashlib.md5(f"{seed}:{key_text}".encode("utf-8")).digest()[:8], "big", signed=True)


# --- checks, all before any row changes --------------------------------------------------------------------------

COLUMNS = """
SELECT a.attname, t.typname, t.typcategory, a.atttypmod, format_type(a.atttypid, a.atttypmod),
       has_column_privilege(a.attrelid, a.attnum, 'SELECT'), has_column_privilege(a.attrelid, a.attnum, 'UPDATE')
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
"""
# single-column unique indexes (the primary key's first) on plain columns, not partial
UNIQUE = """
SELECT a.attname, i.indisprimary, i.indnkeyatts
FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
WHERE i.indrelid = %s AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
ORDER BY i.indisprimary DESC
"""


def check(conn: psycopg.Connection, task: Task, table: str, text: str, into: str, key: str | None,
          model: str) -> Target:
    """The table, its columns and the model, checked against the task; FillError in one line for the first fault."""
    if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
        raise FillError("--dsn names a standby, which cannot be written: give the primary as --dsn and the standby "
                        "as --compute-dsn")
    row = conn.execute("SELECT c.oid, n.nspname, c.relname, c.relkind FROM pg_class c"
                       " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
                       [table]).fetchone()
    if row is None:
        raise FillError(f"no table {table}")
    oid, schema, relname, relkind = row
    name = f"{schema}.{relname}"
    if relkind not in ("r", "p"):
        raise FillError(f"{name} is not a table")
    columns = {r[0]: r[1:] for r in conn.execute(COLUMNS, [oid])}
    for option, column in (("--text", text), ("--into", into), ("--key", key)):
        if column is not None and column not in columns:
            raise FillError(f"{option}: no column {column} in {name}")
    if text == into:
        raise FillError("--text and --into name the same column")
    key = _key(conn, oid, name, key)
    if key in (text, into):
        raise FillError(f"the key {key} cannot be the --text or --into column")
    typname, category, typmod, shown, _, _ = columns[text]
    if category != "S":
        raise FillError(f"--text {text} is {shown}, not text")
    hp = conn.execute(sql.SQL("SELECT n_embd, n_ctx, n_layer FROM {}.hparams").format(sql.Identifier(model))).fetchone()
    n_embd, n_ctx, n_layer = hp
    into_kind = _target_kind(task, into, columns[into], n_embd, model)
    if task.layer is not None and not 0 <= task.layer < n_layer:
        raise FillError(f"--layer must be between 0 and {n_layer - 1} (the blocks of {model}), got {task.layer}")
    if task.name == "complete" and task.sampling.tokens + 1 > n_ctx:
        raise FillError(f"--tokens {task.sampling.tokens} leaves no room for a text in n_ctx = {n_ctx}")
    for column in (key, text, into):
        if not columns[column][4]:
            raise FillError(f"this role may not read {name}.{column}")
    if not columns[into][5]:
        raise FillError(f"this role may not update {name}.{into}")
    return Target(sql.Identifier(schema, relname), name, key, text, into, into_kind, n_ctx)


def _key(conn: psycopg.Connection, oid: int, name: str, key: str | None) -> str:
    """--key if a unique index covers it alone, else the one-column primary key."""
    unique = conn.execute(UNIQUE, [oid]).fetchall()
    if key is not None:
        if not any(column == key and n == 1 for column, _, n in unique):
            raise FillError(f"--key {key} is not unique in {name} (no unique index on it alone): give a key column "
                            f"with one")
        return key
    primary = [(column, n) for column, is_primary, n in unique if is_primary]
    if not primary:
        raise FillError(f"{name} has no primary key: give --key, a column with a unique index")
    column, n = primary[0]
    if n != 1:
        raise FillError(f"the primary key of {name} has {n} columns: give --key, a column with a unique index")
    return column


def _target_kind(task: Task, into: str, column: tuple, n_embd: int, model: str) -> str:
    typname, category, typmod, shown, _, _ = column
    if task.name == "perplexity":
        if typname not in ("float4", "float8", "numeric"):
            raise FillError(f"--into {into} is {shown}: perplexity goes into a float column (real, double "
                            f"precision or numeric)")
        return "float"
    if task.name == "embed":
        if typname not in ("vector", "halfvec"):
            raise FillError(f"--into {into} is {shown}: embed goes into a vector or halfvec column of {n_embd} "
                            f"dimensions")
        if typmod not in (-1, n_embd):
            raise FillError(f"--into {into} is {shown} but {model} embeds in {n_embd} dimensions")
        return "vector"
    if task.name == "classify" and typname in ("jsonb", "json"):
        return "jsonb"
    if category != "S":
        want = "a text or jsonb column" if task.name == "classify" else "a text column"
        raise FillError(f"--into {into} is {shown}: {task.name} goes into {want}")
    return "text"


# --- reading, computing and writing batches ----------------------------------------------------------------------

def pending(conn: psycopg.Connection, t: Target) -> int:
    """The rows a run would visit: target NULL, and a key to write it by (a unique column may hold NULLs)."""
    return conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} IS NULL AND {} IS NOT NULL").format(
        t.table, sql.Identifier(t.into), sql.Identifier(t.key))).fetchone()[0]


def batches(conn: psycopg.Connection, t: Target, size: int) -> Iterator[list[Row]]:
    """The rows whose target is NULL, in key order, `size` at a time: each page a statement of its own (key > the
    last one's), so no snapshot or lock is held across the run."""
    k, x, y = sql.Identifier(t.key), sql.Identifier(t.text), sql.Identifier(t.into)
    select = "SELECT r.{k}, r.{k}::text, r.{x} FROM {t} AS r WHERE r.{y} IS NULL AND r.{k} IS NOT NULL"
    first = sql.SQL(select + " ORDER BY r.{k} LIMIT %s").format(k=k, x=x, y=y, t=t.table)
    after = sql.SQL(select + " AND r.{k} > %s ORDER BY r.{k} LIMIT %s").format(k=k, x=x, y=y, t=t.table)
    rows = [Row(*r) for r in conn.execute(first, [size])]
    while rows:
        yield rows
        if len(rows) < size:
            return
        rows = [Row(*r) for r in conn.execute(after, [rows[-1].key, size])]


class Lengths:
    """Which texts fit n_ctx with what the task adds, counted with the model's tokenizer: only texts whose bytes
    could exceed it are tokenized (a token is at least one byte), and the tokenizer is read on first need."""

    def __init__(self, conn_factory: Callable[[], psycopg.Connection], model: str, task: Task, n_ctx: int):
        self.connect, self.model, self.task, self.n_ctx = conn_factory, model, task, n_ctx
        self.tokenizer: Tokenizer | None = None
        self.lock = threading.Lock()

    def _count(self, text: str) -> int:
        with self.lock:  # read once, by the first job that needs it; the jobs then tokenize at once
            if self.tokenizer is None:
                with self.connect() as conn:
                    self.tokenizer = Tokenizer(*read_vocabulary(conn, self.model))
            tokenizer = self.tokenizer
        return len(tokenizer.encode(text))

    def fits(self, text: str) -> bool:
        task = self.task
        if task.name == "complete":
            extra = task.sampling.tokens
        elif task.name == "perplexity":
            extra = 1  # scored after <|endoftext|>
        elif task.name == "classify":
            extra = 1 + max(len(c.encode("utf-8")) for c in task.choices)
        else:
            extra = 0
        if len(text.encode("utf-8")) + extra <= self.n_ctx:
            return True
        if task.name == "classify":
            extra = 1 + max(self._count(c) for c in task.choices)
        return self._count(text) + extra <= self.n_ctx


def compute(conn: psycopg.Connection, model: str, task: Task, rows: list[Row]) -> list[object]:
    """Each row's value, as JSON takes it for the target: several texts through one query, except classify (whose
    query takes one text and its choices)."""
    texts = [r.text for r in rows]
    if task.name == "perplexity":
        got = dict(query_rows(conn, model, "perplexity", {"gpt.prompts": texts, "gpt.task": "score"}, stream=False))
        return [_json_float(got[i]) for i in range(1, len(rows) + 1)]
    if task.name == "embed":
        layer = "" if task.layer is None else str(task.layer)
        settings = {"gpt.prompts": texts, "gpt.task": "embed", "gpt.layer": layer}
        got = dict(query_rows(conn, model, "embed", settings, stream=False))
        return [_vector_text(got[i]) for i in range(1, len(rows) + 1)]
    if task.name == "complete":
        s = task.sampling
        b = Batch(texts, s.tokens, s.temperature, s.top_n, [row_seed(s.seed, r.key_text) for r in rows], s.top_p,
                  s.stop)
        got = dict(query_rows(conn, model, "text", b.settings(), stream=False))
        return [got.get(i, "") for i in range(1, len(rows) + 1)]
    out = []
    for text in texts:
        probs = [(choice, prob) for _, choice, prob in query_rows(
            conn, model, "classify", {"gpt.prompts": [text, *task.choices], "gpt.task": "classify"}, stream=False)]
        out.append(probs)
    return out


RECOVERY_CONFLICT_TRIES = 3


def compute_on_standby(conn: psycopg.Connection, model: str, task: Task, rows: list[Row]) -> list[object]:
    """compute() on another server: a standby cancels a query whose rows the primary's replay removes (a conflict
    with recovery); the models' tables do not change, but other replay can conflict too, so such a batch is tried
    again, a few times."""
    for attempt in range(1, RECOVERY_CONFLICT_TRIES + 1):
        try:
            return compute(conn, model, task, rows)
        except GenerationError as e:
            if "conflict with recovery" not in str(e) or attempt == RECOVERY_CONFLICT_TRIES:
                raise
    raise AssertionError("unreachable")


def _json_float(v: float) -> float | str:
    return v if math.isfinite(v) else str(v).replace("inf", "Infinity").replace("nan", "NaN")


def _vector_text(v: object) -> str:
    """pgvector's text form, which both vector and halfvec read ('[1,2,3]')."""
    if isinstance(v, str):
        return v
    return "[" + ",".join(repr(float(x)) for x in v.to_numpy()) + "]"  # a registered pgvector type


def as_target(t: Target, value: object) -> object:
    """A classify result as the target takes it: the likeliest choice into text, every probability into jsonb."""
    if isinstance(value, list):
        return dict(value) if t.into_kind == "jsonb" else max(value, key=lambda c: c[1])[0]
    return value


def write(conn: psycopg.Connection, t: Target, keys: list[str], values: list[object]) -> set[str]:
    """One UPDATE of the rows whose target is still NULL; returns the keys written."""
    k, y = sql.Identifier(t.key), sql.Identifier(t.into)
    data = json.dumps([{t.key: key, t.into: value} for key, value in zip(keys, values)], ensure_ascii=False)
    query = sql.SQL("UPDATE {t} AS t SET {y} = v.{y} FROM jsonb_populate_recordset(NULL::{t}, %s::jsonb) AS v"
                    " WHERE t.{k} = v.{k} AND t.{y} IS NULL RETURNING t.{k}::text").format(t=t.table, k=k, y=y)
    return {r[0] for r in conn.execute(query, [data])}


# --- the run ---------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What the jobs share: the summary, a stop flag (Ctrl-C, or an error in a job) and the first error."""
    summary: Summary
    on_rows: Callable[[int], None]
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def done(self, filled: int, skipped: dict[str, list[str]], n: int) -> None:
        with self.lock:
            self.summary.filled += filled
            self.summary.visited += n
            for reason, keys in skipped.items():
                self.summary.skipped[reason] += keys
            self.on_rows(n)


def do_batch(write_conn: psycopg.Connection, compute_conn: psycopg.Connection | None, model: str, task: Task,
             t: Target, lengths: Lengths, rows: list[Row], run: Run) -> None:
    """One batch: its skipped rows counted, the rest computed and written. Computed on the writing connection, the
    compute and the write are one transaction; on another server (compute_conn), the write alone is."""
    skipped = {reason: [] for reason in SKIPS}
    todo = []
    for r in rows:
        if not r.text:
            skipped["empty"].append(r.key_text)
        elif not lengths.fits(r.text):
            skipped["too_long"].append(r.key_text)
        else:
            todo.append(r)
    written: set[str] = set()
    if todo:
        if compute_conn is not None:
            values = compute_on_standby(compute_conn, model, task, todo)
        with write_conn.transaction():
            if compute_conn is None:
                values = compute(write_conn, model, task, todo)
            written = write(write_conn, t, [r.key_text for r in todo], [as_target(t, v) for v in values])
    skipped["filled"] = [r.key_text for r in todo if r.key_text not in written]
    run.done(len(written), skipped, len(rows))


def fill(connect_write: Callable[[], psycopg.Connection], connect_compute: Callable[[], psycopg.Connection] | None,
         task: Task, table: str, text: str, into: str, key: str | None, model: str | None, jobs: int = 1,
         batch: int = 8, on_start: Callable[[int], None] = lambda total: None,
         on_rows: Callable[[int], None] = lambda n: None, stop: threading.Event | None = None) -> Summary:
    """Fill `into` from `text` over the rows of `table` whose `into` IS NULL, with `jobs` connections (each job
    its own writing connection, and computing one if connect_compute is given) taking batches of `batch` rows in
    key order as they are free. Setting `stop` ends the run after the batches in flight."""
    start = time.monotonic()
    reader = connect_write()
    try:
        model = resolve_model(reader, model)
        t = check(reader, task, table, text, into, key, model)
        if connect_compute is not None:
            with connect_compute() as c:
                try:
                    resolve_model(c, model)
                except ModelError:
                    raise FillError(f"model {model} is not on the --compute-dsn server (not replicated yet?)") from None
        run = Run(Summary(pending(reader, t)), on_rows, stop or threading.Event())
        on_start(run.summary.total)
        _run_jobs(reader, connect_write, connect_compute, model, task, t, jobs, batch, run)
    finally:
        reader.close()
    run.summary.seconds = time.monotonic() - start
    # stopped before the end: a Ctrl-C after the last batch was taken interrupts nothing
    run.summary.interrupted = run.stop.is_set() and run.error is None and run.summary.visited < run.summary.total
    if run.error is not None:
        raise run.error
    return run.summary


def _run_jobs(reader: psycopg.Connection, connect_write: Callable[[], psycopg.Connection],
              connect_compute: Callable[[], psycopg.Connection] | None, model: str, task: Task, t: Target, jobs: int,
              batch: int, run: Run) -> None:
    """The reader deals batches from the table into a queue; each job takes the next one when it is free."""
    lengths = Lengths(connect_write, model, task, t.n_ctx)
    work: queue.Queue = queue.Queue(maxsize=jobs)
    conns: list[psycopg.Connection] = []

    def job() -> None:
        try:
            w = connect_write()
            conns.append(w)
            c = connect_compute() if connect_compute is not None else None
            if c is not None:
                conns.append(c)
            while not run.stop.is_set():
                rows = work.get()
                if rows is None:
                    return
                do_batch(w, c, model, task, t, lengths, rows, run)
        except BaseException as e:  # raised by fill(), not lost in the thread
            with run.lock:
                run.error = run.error or e
            run.stop.set()

    threads = [threading.Thread(target=job, daemon=True) for _ in range(jobs)]
    for th in threads:
        th.start()
    try:
        for rows in batches(reader, t, batch):
            while not run.stop.is_set():
                try:
                    work.put(rows, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if run.stop.is_set():
                break
        for _ in threads:  # the jobs end after the batches queued
            while any(th.is_alive() for th in threads):
                try:
                    work.put(None, timeout=0.1)
                    break
                except queue.Full:
                    continue
        while any(th.is_alive() for th in threads):
            for th in threads:
                th.join(timeout=0.1)
            if run.stop.is_set():  # what was queued but not taken stays NULL for the next run
                _drain(work)
    except BaseException:
        run.stop.set()
        for conn in list(conns):  # a second Ctrl-C: cancel the batches in flight (their transactions roll back)
            conn.cancel_safe()
        raise
    finally:
        for conn in list(conns):
            conn.close()


def _drain(work: queue.Queue) -> None:
    while True:
        try:
            work.get_nowait()
        except queue.Empty:
            return
