"""`gpt-sql serve`'s scheduler: a few database connections, and requests gathered into batched queries.

Requests with the same sampling options that arrive within a short window run as one query over all their
prompts (engine.Batch, the text[] form), each prompt with its own seed: one pass through the weights per step
for all of them. A query runs on one connection in a worker thread; its tokens go to each request's asyncio queue
as the server produces them. A request whose client went away is dropped; a query whose every request went away
is cancelled on the server (psycopg's cancel_safe), which frees its backend at once.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass
from typing import Callable, TypeVar

import psycopg

from .engine import Batch, GenerationError, generate_batch_sql

T = TypeVar("T")

WINDOW_S = 0.03  # how long the first request of a batch waits for others to join it
MAX_BATCH = 64  # prompts in one query
# Requests gathered together are dealt over every idle connection rather than run as one query on one;
# GPT_SQL_SERVE_SPLIT=0 turns that off (bench/serve.py compares the two).
SPLIT = os.environ.get("GPT_SQL_SERVE_SPLIT", "1") != "0"
END = object()  # on a Job's queue after its last token


class Cancelled(Exception):
    """The call was cancelled because its client went away."""


class Call:
    """A query that may be cancelled from another thread, whether or not it has started: cancel() before attach()
    makes attach() refuse, so a cancel never misses the query it meant."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self.cancelled = False

    def attach(self, conn: psycopg.Connection | None) -> None:
        with self._lock:
            if self.cancelled and conn is not None:
                raise Cancelled()
            self._conn = conn

    def cancel(self) -> None:
        """Blocking (a cancel request to the server): run it in a thread."""
        with self._lock:
            self.cancelled = True
            conn = self._conn
        if conn is not None:
            conn.cancel_safe(timeout=5)


class Connections:
    """Up to `size` connections, each running one query at a time (one backend, one core each)."""

    def __init__(self, connect: Callable[[], psycopg.Connection], size: int):
        self._connect, self.size = connect, size
        self._idle: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self._all: set[psycopg.Connection] = set()
        self.slots = asyncio.Semaphore(size)

    def _take(self) -> psycopg.Connection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        conn = self._connect()
        conn.execute("SET application_name = 'gpt-sql serve'")
        with self._lock:
            self._all.add(conn)
        return conn

    def _give(self, conn: psycopg.Connection) -> None:
        if conn.broken or conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            with self._lock:
                self._all.discard(conn)
            conn.close()
            return
        with self._lock:
            self._idle.append(conn)

    def run(self, fn: Callable[[psycopg.Connection], T], call: Call) -> T:
        """fn(conn) on a connection of the pool, in this (worker) thread; the caller holds a slot."""
        conn = self._take()
        try:
            call.attach(conn)
            try:
                return fn(conn)
            finally:
                call.attach(None)
        finally:
            self._give(conn)

    async def call(self, fn: Callable[[psycopg.Connection], T], call: Call) -> T:
        """fn(conn) in a worker thread once a connection is free; Cancelled if `call` was cancelled meanwhile."""
        async with self.slots:
            if call.cancelled:
                raise Cancelled()
            try:
                return await asyncio.to_thread(self.run, fn, call)
            except GenerationError:
                if call.cancelled:
                    raise Cancelled() from None
                raise

    def close(self) -> None:
        """Cancel what still runs (shutting down) and close every connection."""
        with self._lock:
            conns = list(self._all)
        for conn in conns:
            try:
                conn.cancel_safe(timeout=2)
            except psycopg.Error:
                pass
            conn.close()


@dataclass(frozen=True)
class Options:
    """What requests must share to run in one query: the model and the sampling options (not the seeds)."""
    model: str
    tokens: int
    temperature: float
    top_n: int
    top_p: float
    stop: tuple[str, ...]
    logprobs: int

    def batch(self, prompts: list[str], seeds: list[int]) -> Batch:
        return Batch(prompts, self.tokens, self.temperature, self.top_n, seeds, self.top_p, self.stop, self.logprobs)


class Job:
    """One request's prompts. Its queue receives (k, Token) per token, k the prompt's index from 0, then END, or
    an exception (the query failed)."""

    def __init__(self, options: Options, prompts: list[str], seeds: list[int]):
        self.options, self.prompts, self.seeds = options, prompts, seeds
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.gone = False
        self.group: Group | None = None

    def put(self, item: object) -> None:
        """From the worker thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Group:
    """Jobs run together as one query."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs
        self.call = Call()

    def work(self, conn: psycopg.Connection) -> None:
        owners = [(job, k) for job in self.jobs for k in range(len(job.prompts))]
        prompts = [job.prompts[k] for job, k in owners]
        seeds = [job.seeds[k] for job, k in owners]
        options = self.jobs[0].options
        for i, token in generate_batch_sql(conn, options.model, options.batch(prompts, seeds)):
            if self.call.cancelled:  # a cancel that reached the backend between two fetches did nothing: stop here
                raise Cancelled()
            job, k = owners[i - 1]
            if not job.gone:
                job.put((k, token))


class Batcher:
    def __init__(self, connections: Connections, window_s: float = WINDOW_S, max_batch: int = MAX_BATCH):
        self.connections, self.window_s, self.max_batch = connections, window_s, max_batch
        self.pending: list[Job] = []
        self.running: set[Group] = set()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self.batches = 0  # queries run: the tests see requests gathered

    def submit(self, job: Job) -> None:
        self.pending.append(job)
        self._wake.set()

    def pending_prompts(self) -> int:
        return sum(len(job.prompts) for job in self.pending)

    def leave(self, job: Job) -> None:
        """The job's client went away: drop it, and cancel its query if no one else waits for it."""
        if job.gone:
            return
        job.gone = True
        job.events.put_nowait(END)  # whoever waits for its tokens stops
        if job in self.pending:
            self.pending.remove(job)
        group = job.group
        if group is not None and all(j.gone for j in group.jobs) and not group.call.cancelled:
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(group.call.cancel))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def serve(self) -> None:
        """Forever: wait for a request, let others join it for the window, then run the group when a connection
        is free (requests that arrive while every connection is busy gather meanwhile)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending:
                await asyncio.sleep(self.window_s)
                await self.connections.slots.acquire()
                free = 1
                while SPLIT and not self.connections.slots.locked():  # other connections idle: theirs too
                    await self.connections.slots.acquire()
                    free += 1
                groups = self._take_groups(free)
                for _ in range(free - len(groups)):
                    self.connections.slots.release()
                for group in groups:
                    task = asyncio.get_running_loop().create_task(self._run(group))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    def _take_groups(self, free: int) -> list[Group]:
        """The pending jobs that share the first one's options (up to max_batch prompts), dealt over up to `free`
        queries, each on a connection of its own (a backend, so a core, each), as `gpt-sql run --batch --jobs`
        deals its prompts."""
        if not self.pending:
            return []
        first = self.pending[0]
        jobs, n = [], 0
        for job in list(self.pending):
            if job.options == first.options and (not jobs or n + len(job.prompts) <= self.max_batch):
                jobs.append(job)
                n += len(job.prompts)
                self.pending.remove(job)
        shares: list[list[Job]] = [[] for _ in range(min(free, len(jobs)))]
        for job in sorted(jobs, key=lambda j: -len(j.prompts)):  # the most prompts to the share that has fewest
            min(shares, key=lambda share: sum(len(j.prompts) for j in share)).append(job)
        groups = [Group(share) for share in shares]
        for group in groups:
            for job in group.jobs:
                job.group = group
        return groups

    async def _run(self, group: Group) -> None:
        """The group's query on a connection whose slot serve() took for it."""
        self.running.add(group)
        self.batches += 1
        error: BaseException | None = None
        try:
            await asyncio.to_thread(self.connections.run, group.work, group.call)
        except Exception as e:  # the query's refusal, a cancel, a lost server: each waiting request gets it
            error = e
        finally:
            self.connections.slots.release()
            self.running.discard(group)
        for job in group.jobs:
            if not job.gone:
                job.events.put_nowait(error if error is not None else END)

    async def stop(self) -> None:
        for group in list(self.running):
            await asyncio.to_thread(group.call.cancel)
