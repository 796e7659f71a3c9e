"""`gpt-sql run --batch FILE`: many prompts, generated together in SQL, each completion reported when it ends.

A batch file holds one prompt per line, or JSON objects, one per line, with "prompt" and optionally "seed". The
prompts are checked whole before anything is generated; with several jobs, each job is one connection (one
backend, so one core) running one batched query over its share of the prompts.
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, TextIO

import psycopg
from psycopg import sql

from .engine import Batch, GenerationError, NumpyEngine, Token, check_text, generate_batch_sql
from .models import read_vocabulary
from .tokenizer import Tokenizer


class BatchFileError(Exception):
    """The batch file cannot be read as prompts; the message names the line."""


@dataclass(frozen=True)
class Item:
    """One prompt of the batch: its number from 1 (its order in the file), its text, its seed if the file gives one."""
    i: int
    prompt: str
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    i: int
    prompt: str
    seed: int
    tokens: list[Token]

    def json(self) -> str:
        data = b"".join(t.bytes for t in self.tokens)
        out = {"i": self.i, "prompt": self.prompt, "tokens": [t.token for t in self.tokens],
               "text": data.decode("utf-8", errors="replace"), "seed": self.seed}
        if self.tokens and self.tokens[0].top is not None:
            out["top_logprobs"] = [[{"token": k, "logprob": lp} for k, lp in t.top] for t in self.tokens]
        return json.dumps(out, ensure_ascii=False)


def read_items(lines: TextIO, name: str) -> list[Item]:
    """Prompts from a file's lines: JSON objects ({"prompt": ..., "seed": ...}) if its first non-blank line is one,
    else each line a prompt (blank lines skipped: an empty prompt is {"prompt": ""})."""
    rows = [(n, line.rstrip("\r\n")) for n, line in enumerate(lines, 1)]
    rows = [(n, line) for n, line in rows if line.strip()]
    if not rows:
        raise BatchFileError(f"{name}: no prompts")
    if not rows[0][1].lstrip().startswith("{"):
        items = [Item(i, line) for i, (_, line) in enumerate(rows, 1)]
        for (n, _), item in zip(rows, items):
            _check(item.prompt, f"{name} line {n}")
        return items
    items = []
    for i, (n, line) in enumerate(rows, 1):
        where = f"{name} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BatchFileError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise BatchFileError(f'{where}: expected an object with a "prompt" string')
        seed = obj.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not -2**63 <= seed < 2**63):
            raise BatchFileError(f'{where}: "seed" must be a whole number that fits in 64 bits')
        _check(obj["prompt"], where)
        items.append(Item(i, obj["prompt"], seed))
    return items


def _check(prompt: str, where: str) -> None:
    try:
        check_text(prompt, "the prompt")
    except GenerationError as e:
        raise BatchFileError(f"{where}: {e}") from None


def open_items(path: str, stdin: TextIO) -> list[Item]:
    """The items of a batch file, or of stdin for '-'."""
    if path == "-":
        return read_items(stdin, "stdin")
    try:
        with Path(path).open(encoding="utf-8") as f:
            return read_items(f, path)
    except UnicodeDecodeError:
        raise BatchFileError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise BatchFileError(f"{path}: {e.strerror}") from None


def check_lengths(conn: psycopg.Connection, model: str, items: list[Item], tokens: int) -> None:
    """Every prompt and its new tokens fit n_ctx, counted with the model's own tokenizer: with several jobs a job
    would otherwise generate before another's query finds a prompt too long (one query checks all its own)."""
    n_ctx = conn.execute(sql.SQL("SELECT n_ctx FROM {}.hparams").format(sql.Identifier(model))).fetchone()[0]
    tokenizer = Tokenizer(*read_vocabulary(conn, model))
    for item in items:
        n = max(1, len(tokenizer.encode(item.prompt)))
        if n + tokens > n_ctx:
            raise GenerationError(f"prompt {item.i} is {n} tokens and {tokens} new tokens were asked for: together "
                                  f"at most n_ctx = {n_ctx} fit")


def shares(items: list[Item], jobs: int) -> list[list[Item]]:
    """The items dealt round-robin to the jobs, so that each gets long and short prompts alike."""
    return [s for s in (items[j::jobs] for j in range(jobs)) if s]


def completions_sql(conn: psycopg.Connection, model: str, items: list[Item], options: Batch, seed: int,
                    timeout_s: float | None = None,
                    on_token: Callable[[], None] = lambda: None) -> Iterator[Completion]:
    """One batched query over the items with the options' parameters (its prompts and seeds aside); each completion
    as soon as its last token (or <|endoftext|>) arrives, and those that ended at a stop string when the query ends."""
    eot = conn.execute(sql.SQL("SELECT eot FROM {}.hparams").format(sql.Identifier(model))).fetchone()[0]
    seeds = [item.seed if item.seed is not None else seed for item in items]
    batch = replace(options, prompts=[item.prompt for item in items], seeds=seeds)
    got: dict[int, list[Token]] = {}

    def completion(k: int) -> Completion:
        item = items[k - 1]
        return Completion(item.i, item.prompt, seeds[k - 1], got.pop(k))

    for k, t in generate_batch_sql(conn, model, batch, timeout_s):
        got.setdefault(k, []).append(t)
        on_token()
        if t.step == options.tokens or t.token == eot:
            yield completion(k)
    for k in sorted(got):
        yield completion(k)


def completions_numpy(engine: NumpyEngine, items: list[Item], options: Batch, seed: int,
                      on_token: Callable[[], None] = lambda: None) -> Iterator[Completion]:
    """The same, one prompt after another in the NumPy reference."""
    for item in items:
        s = item.seed if item.seed is not None else seed
        out = []
        for t in engine.generate(replace(options, prompts=[item.prompt], seeds=[s]).params(1)):
            out.append(t)
            on_token()
        yield Completion(item.i, item.prompt, s, out)


def run_jobs(connect: Callable[[], psycopg.Connection], model: str, items: list[Item], jobs: int, options: Batch,
             seed: int, timeout_s: float | None = None,
             on_token: Callable[[], None] = lambda: None) -> Iterator[Completion]:
    """The items over `jobs` connections at once (made by `connect()`), completions as they end. An error in one
    job cancels the others' queries and is raised here."""
    if jobs == 1:
        yield from completions_sql(connect(), model, items, options, seed, timeout_s, on_token)
        return
    done: queue.Queue = queue.Queue()
    conns: list[psycopg.Connection] = []
    lock = threading.Lock()

    def job(share: list[Item]) -> None:
        try:
            conn = connect()
            with lock:
                conns.append(conn)
            for c in completions_sql(conn, model, share, options, seed, timeout_s, on_token):
                done.put(c)
            done.put(None)
        except BaseException as e:  # raised by the reader below, not lost in the thread
            done.put(e)

    threads = [threading.Thread(target=job, args=(share,), daemon=True) for share in shares(items, jobs)]
    for th in threads:
        th.start()
    running = len(threads)
    try:
        while running:
            got = done.get()
            if got is None:
                running -= 1
            elif isinstance(got, BaseException):
                raise got
            else:
                yield got
    finally:
        with lock:
            for conn in conns:
                conn.cancel_safe()
        for th in threads:
            th.join(timeout=10)
        for conn in conns:
            conn.close()
